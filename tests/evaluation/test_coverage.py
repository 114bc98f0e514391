"""The converter's surveys: attention criterion, per-model checks, the report, the family picks."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from attention_net import MHANet
from timm_bcos import convert_to_bcos
from timm_bcos.evaluation import coverage
from timm_bcos.evaluation.coverage import (COVERAGE_MODELS, CRASHED, EXACT, REFUSED, CoverageResult, check_model,
                                           dynamic_gates, eq13_autograd)
from timm_bcos.evaluation.coverage_report import coverage_report, summary_lines
from timm_bcos.evaluation.families import attention_evidence, smallest_per_family, timm_families


class GatedNet(nn.Module):
    """A CNN with a squeeze-excite gate (an elementwise product of two input-dependent tensors) and a
    product with a weight matrix: neither is dot-product attention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.se = nn.Conv2d(8, 8, 1)
        self.proj = nn.Parameter(torch.randn(8, 8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))
        return self.fc(x.mean((2, 3)) @ self.proj)


class QKNet(GatedNet):
    """The same with a dot product between features (q @ k^T over the pixels)."""

    def forward(self, x):
        t = F.relu(self.conv(x)).flatten(2).transpose(1, 2)
        attn = (t @ t.transpose(1, 2)).softmax(-1)
        return self.fc((attn @ t).mean(1))


def test_attention_criterion():
    assert attention_evidence(GatedNet(), (3, 8, 8)) is None
    assert attention_evidence(QKNet(), (3, 8, 8)) == 'matmul in <root>'
    mha = nn.Sequential(nn.Conv2d(3, 8, 1))
    mha.attn = nn.MultiheadAttention(8, 2)
    assert attention_evidence(mha, (3, 8, 8)) == 'nn.MultiheadAttention at attn'
    vit = timm.create_model('test_vit', num_classes=10)
    assert attention_evidence(vit, vit.pretrained_cfg['input_size']).endswith('in blocks.0.attn')
    assert all(p.requires_grad for p in vit.parameters())  # left as they were


def test_gates_are_listed_and_eq13_check_catches_a_nonlinearity():
    model = convert_to_bcos(GatedNet(), calibrate=False).double()
    assert [what for _, what in dynamic_gates(model)] == ['sigmoid()']
    x = torch.rand(2, 6, 8, 8, dtype=torch.float64)
    assert eq13_autograd(model, x) < 1e-12
    model.fc = nn.Sequential(nn.Softplus(), model.fc)  # not dynamic linear: the check must see it
    assert eq13_autograd(model, x) > 1e-3


def test_check_model_outcomes(monkeypatch):
    r = check_model('test_resnet', img_size=64)
    assert (r.family, r.group, r.outcome, r.reason) == ('resnet', 'CNN', EXACT, '')
    assert r.error < 1e-10 and r.alive and r.input_size == (64, 64)
    monkeypatch.setattr(timm, 'create_model', lambda name, **kwargs: MHANet())
    r = check_model('test_resnet', img_size=8)
    assert (r.group, r.outcome, r.error) == ('attention', REFUSED, None)
    assert r.reason.startswith('UnsupportedModuleError: cannot convert MultiheadAttention at \'attn\'')

    def crash(model, size):
        raise RuntimeError('boom')

    monkeypatch.setattr(timm, 'create_model', lambda name, **kwargs: GatedNet())
    monkeypatch.setattr(coverage, '_train_step', crash)
    r = check_model('test_resnet', img_size=8)
    assert (r.outcome, r.reason) == (CRASHED, 'train-mode forward + backward: RuntimeError: boom')


def test_check_model_builds_a_vit_for_its_img_size(monkeypatch):
    """A ViT fixes its positional embedding when built: a survey at another size builds it for that size
    (the two largest attention families are checked at 224 px: their own size does not fit in memory)."""
    built = []
    create = timm.create_model

    def recording(name, **kwargs):
        model = create(name, **kwargs)
        built.append((name, kwargs.get('img_size'), model.patch_embed.grid_size if 'vit' in name else None))
        return model
    monkeypatch.setattr(timm, 'create_model', recording)
    r = check_model('test_vit', img_size=64)
    assert (r.group, r.outcome, r.input_size) == ('attention', EXACT, (64, 64)) and r.error < 1e-10
    assert built == [('test_vit', 64, (4, 4))]
    r = check_model('test_resnet', img_size=64)  # a CNN's constructor takes no img_size: built as it is
    assert r.outcome == EXACT and built[-1] == ('test_resnet', None, None)


def _result(model, group, outcome, error=None, spread=None, gates=()):
    return CoverageResult(model, model.split('_')[0], group, outcome, 1_000_000, (64, 64), error, spread, 1.0,
                          '' if outcome == EXACT else 'why | not', 'matmul in blocks.0' if group == 'attention' else '',
                          gates)


def test_report_groups_counts_and_gates():
    results = [_result('a_cnn', 'CNN', EXACT, 1e-15, 1.0, (('s.gate', 'sigmoid()'),) * 2),
               _result('b_cnn', 'CNN', CRASHED), _result('c_cnn', 'CNN', EXACT, 1e-15, 50.0),
               _result('d_vit', 'attention', REFUSED)]
    lines = summary_lines(results, 'families')
    assert lines[0].startswith('- **CNNs (no dot-product attention)** (families: 3): exact 2, crashed after '
                               'conversion 1. Exact (Eq. 13 error <= 1e-06): 2/3 (67%). Alive at start')
    assert lines[0].endswith('1/2 of those that ran.') and 'refused 1' in lines[1]
    text = coverage_report(results, 'timm-bcos coverage --families', 'families')
    assert text.count('| family | model |') == 2 and '| attention found |' in text
    assert '| d | d_vit | 1.0 | refused |' in text and 'why \\| not' in text and 'matmul in blocks.0' in text
    assert '| sigmoid() x2 |' in text and '**a_cnn**: `s.gate` (sigmoid())' in text


def test_smallest_per_family(monkeypatch):
    create = timm.create_model

    def failing(name, **kwargs):
        if name == 'vgg11':
            raise RuntimeError('no meta')
        return create(name, **kwargs)

    families = timm_families()
    assert 'resnet' in families and 'bcos_models' in timm.list_modules() and 'bcos_models' not in families
    picks, skipped = smallest_per_family(['vgg'], progress=False)
    assert [(p.family, p.model) for p in picks] == [('vgg', 'vgg11')] and skipped == {}
    monkeypatch.setattr(timm, 'create_model', failing)
    picks, skipped = smallest_per_family(['vgg'], progress=False)
    assert picks[0].model == 'vgg11_bn' and skipped == {'vgg11': 'RuntimeError: no meta'}
    with pytest.raises(ValueError, match='not timm model families'):
        smallest_per_family(['no_such_family'])


def test_smallest_per_family_takes_classifiers_only():
    """Gemma4-ViT's smallest model is an encoder without logits (num_classes stays 0): its classifier is taken."""
    picks, skipped = smallest_per_family(['gemma4_vit'], progress=False)
    assert [p.model for p in picks] == ['gemma4_vit_167m']
    assert skipped['gemma4_vit_167m_enc'].startswith('ValueError: not a classifier: num_classes=0')


@pytest.mark.slow
@pytest.mark.parametrize('name', COVERAGE_MODELS)
def test_coverage(name):
    r = check_model(name)
    assert r.outcome == EXACT and r.group == 'CNN', r.reason
    assert r.error < 1e-10 and not math.isnan(r.spread) and r.alive, r


def test_surveys_run_in_parts_merge_into_one_report(tmp_path):
    from timm_bcos.evaluation.coverage_cli import coverage_main
    coverage_main(['--models', 'test_resnet', '--out', str(tmp_path / 'a.md')])
    coverage_main(['--models', 'test_vit', '--out', str(tmp_path / 'b.md')])
    coverage_main(['--merge', str(tmp_path / 'a.md.json'), str(tmp_path / 'b.md.json'), '--out',
                   str(tmp_path / 'all.md')])
    text = (tmp_path / 'all.md').read_text()
    assert '| resnet | test_resnet |' in text and '| vision_transformer | test_vit |' in text
    assert text.count('| exact |') == 2 and 'Attention / transformer models** (models: 1): exact 1' in text
