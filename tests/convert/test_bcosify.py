"""B-cosification (`timm_bcos.bcosify`): the B=1 form computes the original logits; the B-cos form
is exactly dynamic linear (Eq. 13) and starts alive; options, errors and all-or-nothing."""
import copy

import pytest
import timm
import torch
from torch import nn

from timm_bcos import (ActivationGate, BcosConv2d, BcosLinear, UnsupportedModuleError, add_inverse, bcosify,
                       convert_to_bcos)
from timm_bcos.layers import BatchNormUncentered2d, InputShift

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


pytestmark = pytest.mark.usefixtures('one_thread')


def _trained_like(model: nn.Module, size: int) -> nn.Module:
    """Random weights with non-trivial norm statistics and affine parameters, in eval mode (a
    pretrained model's state, without a download)."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return model.eval()


def _original_logits(model: nn.Module, x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    with torch.no_grad():
        return model((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))


class UserNet(nn.Module):
    """A user's own CNN: biases, BatchNorm, ReLU, a max-pool, a reflect-padded stem, inline ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode='reflect')
        self.body = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.GELU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.body(self.stem(x)) + 0.5)
        return self.fc(x.mean((2, 3)))


def test_b1_form_computes_the_original_logits():
    model = _trained_like(UserNet(), 8)
    x = torch.rand(3, 3, 8, 8)
    expected = _original_logits(model, x)
    b1 = bcosify(copy.deepcopy(model), b=1.0, preserve_function=True, mean=MEAN, std=STD)
    assert isinstance(b1.stem[0], InputShift) and b1.stem[1].in_channels == 6
    assert b1.bcos_cfg['bcosified']['preserve_function'] and b1.bcos_cfg['stem'] == ['stem.1']
    with torch.no_grad():
        got = b1(add_inverse(x))
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_bcos_form_is_dynamic_linear_and_alive():
    data = add_inverse(torch.rand(8, 3, 8, 8))
    model = bcosify(_trained_like(UserNet(), 8), mean=MEAN, std=STD, calibration_data=data)
    assert model.bcos_cfg['b'] == 2.0 and model.bcos_cfg['logit_bias'] < 0
    layers = [m for m in model.modules() if isinstance(m, (BcosConv2d, BcosLinear))]
    assert layers and all(m.bias is None and not m.normalized and m.max_out == 1 for m in layers)
    assert any(isinstance(m, ActivationGate) for m in model.modules())  # ReLU, GELU kept as gates
    assert any(isinstance(m, BatchNormUncentered2d) for m in model.modules())
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    x = add_inverse(torch.rand(2, 3, 8, 8, dtype=torch.float64))
    assert model.double().check_dynamic_linearity(x) < 1e-10
    with torch.no_grad():
        spread = (model(add_inverse(torch.rand(8, 3, 8, 8, dtype=torch.float64))) - model.bcos_cfg['logit_bias']).std()
    assert 0.1 < spread < 10


@pytest.mark.parametrize('name,size', [('resnet18', 32), ('test_efficientnet', 32), ('test_convnext', 32),
                                       ('test_nfnet', 32)])  # weight-standardised convs
def test_timm_models(name, size):
    model = _trained_like(timm.create_model(name, num_classes=5), size)
    cfg = model.pretrained_cfg
    x = torch.rand(2, 3, size, size)
    expected = _original_logits(model, x, cfg['mean'], cfg['std'])
    b1 = bcosify(copy.deepcopy(model), b=1.0, preserve_function=True)
    with torch.no_grad():
        assert torch.allclose(b1(add_inverse(x)), expected, rtol=0, atol=1e-4 * expected.abs().max())
    bcos = bcosify(model, calibration_data=add_inverse(torch.rand(4, 3, size, size))).double()
    assert bcos.check_dynamic_linearity(add_inverse(x.double())) < 1e-10
    assert bcos.pretrained_cfg['mean'] == (0.0,)  # takes [x, 1-x] of images in [0, 1]


def test_options():
    model = bcosify(_trained_like(UserNet(), 8), mean=MEAN, std=STD, normalized=True, activations='remove',
                    max_pool='keep', norm='none', calibrate=False)
    assert not any(isinstance(m, (ActivationGate, nn.BatchNorm2d, BatchNormUncentered2d)) for m in model.modules())
    assert any(isinstance(m, nn.MaxPool2d) for m in model.modules())  # selects an input: dynamic linear
    assert all(m.normalized for m in model.modules() if isinstance(m, (BcosConv2d, BcosLinear)))
    assert model.double().check_dynamic_linearity(add_inverse(torch.rand(2, 3, 8, 8, dtype=torch.float64))) < 1e-10
    resnet = bcosify(_trained_like(timm.create_model('resnet18', num_classes=5), 32), head='conv', calibrate=False)
    assert resnet.fc.fc.weight.shape == (5, 512, 1, 1)


def test_errors_leave_the_model_as_it_was():
    model = _trained_like(UserNet(), 8)
    with pytest.raises(ValueError, match='B=1 form'):
        bcosify(model, b=2.0, preserve_function=True)
    with pytest.raises(ValueError, match="norm must be one of"):
        bcosify(model, norm='ln')
    with pytest.raises(ValueError, match='positive std'):
        bcosify(model, mean=MEAN, std=(0.2, 0.0, 0.1))
    model.body.append(nn.LSTM(8, 8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match='LSTM'):
        bcosify(model, mean=MEAN, std=STD, calibrate=False)
    assert type(model.stem) is nn.Conv2d and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match='already a B-cos network'):
        bcosify(convert_to_bcos(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), calibrate=False))


# --- saving and loading back through timm ---------------------------------------------------------

@pytest.mark.parametrize('base,preserve', [('resnet18', False), ('resnet18', True), ('regnetx_002', False)])
def test_saved_bcosified_model_loads_back_through_timm(base, preserve, tmp_path):
    """`save_pretrained` writes ``bcos_<arch>`` (the paper's architectures) or ``bcosified`` with the
    `bcosify_args`; ``local-dir:`` rebuilds the structure and loads the weights, scales included."""
    from timm_bcos.convert import bcosify_args
    from timm_bcos.models.export import save_pretrained

    model = _trained_like(timm.create_model(base, num_classes=5), 32)
    calibration = dict(calibration_data=add_inverse(torch.rand(8, 3, 32, 32)))
    options = dict(b=1.0, preserve_function=True) if preserve else calibration
    bcosify(model, mean=MEAN, std=STD, **options)
    save_pretrained(model, str(tmp_path))
    config = __import__('json').loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == ('bcos_resnet18' if base == 'resnet18' else 'bcosified')
    assert config['model_args']['bcosify'] == bcosify_args(model)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    x = add_inverse(torch.rand(3, 3, 32, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert loaded.bcos_cfg['bcosified'] == model.bcos_cfg['bcosified']
    assert bcosify_args(loaded) == bcosify_args(model)


def test_bcosify_args_and_saving_errors(tmp_path):
    from timm_bcos.convert import bcosify_args
    from timm_bcos.models.export import save_pretrained

    with pytest.raises(ValueError, match='not a B-cosified model'):
        bcosify_args(convert_to_bcos(timm.create_model('resnet18', num_classes=3), calibrate=False))
    user = bcosify(UserNet(), mean=MEAN, std=STD, calibration_data=add_inverse(torch.rand(4, 3, 16, 16)))
    with pytest.raises(ValueError, match='source architecture is unknown'):
        save_pretrained(user, str(tmp_path))
    with pytest.raises(ValueError, match='in_chans must be even'):
        timm.create_model('bcosified', base_model='resnet18', bcosify={}, in_chans=3)
    with pytest.raises(ValueError, match='conversion arguments'):
        timm.create_model('bcos_resnet18', bcosify={}, max_out=2)
