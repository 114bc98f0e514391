"""Calibrated initial scales (issue: every converted network starts alive)."""
import copy
import math

import pytest
import timm
import torch
from safetensors.torch import load, save
from torch import nn

import timm_bcos
from timm_bcos.convert import calibrate_scales, calibration_batch
from timm_bcos.layers import BcosConv2d, BcosLinear, LogitLayer, add_inverse

torch.set_flush_denormal(True)


def _images(n=4, size=64, seed=1, dtype=torch.float32):
    return add_inverse(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype))


def _spread(model, x):
    with torch.no_grad():
        return (model.eval()(x) - model.bcos_cfg['logit_bias']).std().item()


@pytest.mark.parametrize('name', ['vgg11', 'efficientnet_b0', 'regnety_002'])
def test_calibrated_conversion_starts_alive(name):
    """Without calibration the logits are dead (VGG: spread 0) or explode (1e5-1e14); calibrated on one
    batch they have unit spread on another, and the model stays exactly dynamic-linear."""
    fixed = timm_bcos.convert_to_bcos(timm.create_model(name, num_classes=10), calibrate=False)
    model = timm_bcos.convert_to_bcos(timm.create_model(name, num_classes=10), calibration_data=_images(seed=0))
    x = _images(seed=1)
    assert not 0.1 <= _spread(fixed, x) <= 10
    assert 0.5 <= _spread(model, x) <= 2
    assert model.double().check_dynamic_linearity(x.double()) < 1e-10


def test_default_calibration_batch_is_the_pretrained_input_size():
    model = timm_bcos.convert_to_bcos(timm.create_model('resnet18', num_classes=10))
    batch = calibration_batch(model)
    assert batch.shape == (4, 6, 224, 224)
    assert torch.allclose(batch[:, :3] + batch[:, 3:], torch.ones(()))
    assert torch.equal(batch, calibration_batch(model))  # seeded
    assert model.bcos_cfg['calibrate'] is True
    assert 0.5 <= _spread(model, _images(2, 224)) <= 2


def test_a_vit_built_for_another_size_is_traced_and_calibrated_at_it():
    """timm's ViT built with img_size=64 keeps pretrained_cfg input_size 160: the converter's example
    input (concrete tracing) and calibration batch take the size it was built for."""
    from timm_bcos.convert.calibrate import example_input
    vit = timm.create_model('test_vit', img_size=64, num_classes=4)
    assert vit.pretrained_cfg['input_size'] == (3, 160, 160) and example_input(vit).shape == (2, 3, 64, 64)
    assert calibration_batch(timm_bcos.convert_to_bcos(vit)).shape == (4, 6, 64, 64)


def test_every_layer_has_unit_rms_on_the_calibration_batch():
    model = timm_bcos.convert_to_bcos(timm.create_model('resnet18', num_classes=10), calibration_data=_images())
    rms = {}

    def record(path, out):
        rms.setdefault(path, out.pow(2).mean().sqrt().item())

    hooks = [m.register_forward_hook(lambda m, a, out, p=p: record(p, out))
             for p, m in model.named_modules() if isinstance(m, BcosConv2d)]
    with torch.no_grad():
        logits = model.eval()(_images())
    for h in hooks:
        h.remove()
    assert len(rms) == 20 and all(abs(v - 1) < 1e-4 for v in rms.values()), rms
    assert (logits - model.bcos_cfg['logit_bias']).std().item() == pytest.approx(1, rel=1e-4)


def test_calibrate_false_keeps_the_fixed_scales():
    model = timm_bcos.convert_to_bcos(timm.create_model('resnet18', num_classes=10), calibrate=False)
    assert model.conv1.scale == pytest.approx(math.sqrt(6 * 49) / 100)
    assert not any(k.endswith(('.scale', '.temperature')) for k in model.state_dict())
    assert model.bcos_cfg['calibrate'] is False


def test_given_logit_temperature_is_kept():
    model = timm_bcos.convert_to_bcos(timm.create_model('resnet18', num_classes=10), logit_temperature=3.0,
                                      calibration_data=_images())
    assert model.fc.logit.temperature == 3.0 and model.fc.calibrated


def _state(model):
    return load(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def test_scales_travel_in_the_state_dict():
    """A calibrated checkpoint loads identically into an uncalibrated model; an uncalibrated one (every
    released checkpoint) restores the constructed scales in a calibrated model; strict loading fits both."""
    calibrated = timm_bcos.convert_to_bcos(timm.create_model('resnet18', num_classes=10), calibration_data=_images())
    fixed = timm_bcos.convert_to_bcos(timm.create_model('resnet18', num_classes=10), calibrate=False)
    state = _state(calibrated)
    assert state['conv1.scale'].dtype == torch.float64 and 'fc.logit.temperature' in state
    x = _images(2, 32, seed=5)
    reloaded = copy.deepcopy(fixed)
    reloaded.load_state_dict(state)
    assert torch.equal(reloaded.eval()(x), calibrated.eval()(x))
    old = copy.deepcopy(calibrated)
    old.load_state_dict(_state(fixed))
    assert old.conv1.scale == fixed.conv1.scale and old.fc.logit.temperature is None
    assert torch.equal(old.eval()(x), fixed.eval()(x))
    partial = copy.deepcopy(calibrated)  # a checkpoint without a layer leaves that layer's scale alone
    partial.load_state_dict({k: v for k, v in _state(fixed).items() if not k.startswith('fc.')}, strict=False)
    assert partial.fc.calibrated and partial.fc.scale == calibrated.fc.scale and not partial.conv1.calibrated


@pytest.mark.parametrize('bad', [torch.tensor(-1.0, dtype=torch.float64), torch.tensor(float('nan')),
                                 torch.ones(2), torch.tensor(1)])
def test_a_corrupt_scale_is_refused(bad):
    model = timm_bcos.convert_to_bcos(timm.create_model('resnet18', num_classes=10), calibration_data=_images())
    state = dict(model.state_dict(), **{'layer1.0.conv1.scale': bad})
    with pytest.raises(RuntimeError, match=r'layer1\.0\.conv1\.scale'):
        model.load_state_dict(state)


def test_exported_model_reloads_identically(tmp_path):
    model = timm.create_model('bcos_resnet18', num_classes=10)
    assert model.bcos_cfg['calibrate'] and model.conv1.calibrated
    timm_bcos.models.save_pretrained(model, str(tmp_path / 'run'))
    loaded = timm.create_model(f'local-dir:{tmp_path / "run"}', pretrained=True)
    assert not loaded.bcos_cfg['calibrate']  # built without the calibration pass; the scales are the checkpoint's
    x = _images(2, 64)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_reset_classifier_calibrates_the_new_head():
    model = timm_bcos.convert_to_bcos(timm.create_model('resnet18', num_classes=10), calibration_data=_images(2, 96))
    model.reset_classifier(5)
    assert model.fc.calibrated and model.fc.logit.calibrated
    assert 0.5 <= _spread(model, _images(4, 224)) <= 2


@pytest.mark.parametrize('data, match', [
    (torch.rand(2, 3, 32, 32), 'add_inverse'),
    (torch.full((2, 6, 32, 32), float('nan')), 'NaN'),
    (torch.ones(2, 6, 32, 32, dtype=torch.int64), 'floating point'),
    (torch.zeros(2, 6, 32, 32), 'all zeros'),
])
def test_bad_calibration_data_leaves_the_model_untouched(data, match):
    model = timm.create_model('resnet18', num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        timm_bcos.convert_to_bcos(model, calibration_data=data)
    assert [type(m) for m in model.modules()] == types and isinstance(model.conv1, nn.Conv2d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()(torch.rand(1, 3, 32, 32))


def _own_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))


def test_own_network_is_calibrated_on_its_own_data_and_warns_without():
    """A network without a pretrained_cfg has no known input size: 224 px noise could exhaust memory
    (attention over 50k tokens) or not fit at all, so it needs calibration_data or warns."""
    with pytest.warns(UserWarning, match='Sequential has no pretrained_cfg input size.*calibration_data='):
        fixed = timm_bcos.convert_to_bcos(_own_net())
    assert not fixed.bcos_cfg['calibrate'] and not any(m.calibrated for m in fixed.modules()
                                                       if isinstance(m, (BcosConv2d, BcosLinear)))
    with pytest.raises(ValueError, match='no pretrained_cfg input size.*calibration_data'):
        calibration_batch(fixed)
    model = timm_bcos.convert_to_bcos(_own_net(), calibration_data=_images(8, 16))
    assert model.bcos_cfg['calibrate'] and 0.5 <= _spread(model, _images(8, 16)) <= 2
    assert model.double().check_dynamic_linearity(_images(2, 16, dtype=torch.float64)) < 1e-10


def test_calibrate_scales_on_own_data_and_a_subset_of_layers():
    model = timm_bcos.convert_to_bcos(timm.create_model('resnet18', num_classes=10), calibrate=False)
    stem = model.conv1.scale
    result = calibrate_scales(model, _images(), layers=['fc'])
    assert model.conv1.scale == stem and set(result.scales) == {'fc'} and result.temperature is not None
    assert model.fc.calibrated and isinstance(model.fc.logit, LogitLayer) and model.fc.logit.calibrated
    result = calibrate_scales(model, _images())
    assert len(result.scales) == sum(isinstance(m, (BcosConv2d, BcosLinear)) for m in model.modules())
    with pytest.raises(ValueError, match='positive'):
        model.conv1.set_calibrated(0.0)


def test_fine_tuning_a_calibrated_checkpoint_calibrates_the_new_head(tmp_path):
    model = timm.create_model('bcos_resnet18', num_classes=10)
    timm_bcos.models.save_pretrained(model, str(tmp_path / 'run'))
    tuned = timm.create_model(f'local-dir:{tmp_path / "run"}', pretrained=True, num_classes=5)
    assert tuned.conv1.scale == model.conv1.scale and tuned.fc.calibrated and tuned.fc.logit.calibrated
    assert 0.5 <= _spread(tuned, _images(4, 224)) <= 2
