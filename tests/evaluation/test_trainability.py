"""Trainability survey: converted timm models train on digits; failures and the report."""
import pytest
import timm
from torch import nn

from attention_net import MHANet
from timm_bcos.evaluation.coverage import REFUSED
from timm_bcos.evaluation.trainability import (TARGET_ACCURACY, TRAINED, Recipe, TrainabilityResult,
                                               check_trainability, trainability_report)

# The survey's recipe (batch, lr, data) cut to 100 steps: CI's 2 cores train the two cheapest required
# models in about a minute (the survey, `timm-bcos coverage --train`, gives every model the full budget).
CI_RECIPE = Recipe(steps=100)


@pytest.mark.parametrize('name', ['regnetx_002', 'regnety_002'])
def test_converted_model_trains(name):
    r = check_trainability(name, CI_RECIPE)
    assert r.outcome == TRAINED and r.img_size == 32, r.reason
    assert r.loss_end < 0.5 * r.loss_start
    assert r.accuracy >= TARGET_ACCURACY, r


def test_refusal_and_larger_input_are_recorded(monkeypatch):
    monkeypatch.setattr(timm, 'create_model', lambda name, **kwargs: MHANet())
    r = check_trainability('resnet18', Recipe(steps=2))
    assert r.outcome == REFUSED and "MultiheadAttention at 'attn'" in r.reason and r.accuracy is None
    needs_40px = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(40), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(4, 10))
    monkeypatch.setattr(timm, 'create_model', lambda name, **kwargs: needs_40px)
    r = check_trainability('resnet18', Recipe(steps=2, batch_size=8))
    assert (r.outcome, r.img_size, r.reason) == (TRAINED, 64, '') and 0 <= r.accuracy <= 1


def test_report():
    results = [TrainabilityResult('a', TRAINED, 2_000_000, 32, 1.0, 0.5, 0.01, 0.95, 12.0),
               TrainabilityResult('b', TRAINED, 1_000_000, 64, 0.3, 0.4, 0.2, 0.55, 30.0, 'x | y'),
               TrainabilityResult('c', REFUSED, reason='no')]
    text = trainability_report(results, Recipe(steps=7), 'timm-bcos coverage --train')
    assert text.startswith('# Trainability') and '**1/3** converted models reach >= 80% held-out' in text
    assert 'Lowest: c (-), b (55.0%), a (95.0%).' in text and '7 steps of batch 64' in text
    assert '| b | 1.0 | 64 | trained | 0.3 | 0.4000 | 0.2000 | 55.0% | 30 | x \\| y |' in text
    assert '| c | - | - | refused | - | - | - | - | 0 | no |' in text
