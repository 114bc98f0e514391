"""convert_to_bcos: user models, timm models, rules, errors, timm API, trainability (the coverage survey:
tests/evaluation/test_coverage.py)."""
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_bcos
from timm_bcos import AddInverse, BcosConv2d, DynamicGate, UnsupportedModuleError, convert_to_bcos
from timm_bcos.convert import unconverted_modules
from timm_bcos.layers import BcosClassifier, BcosConvClassifier



def _x(n=2, size=32, dtype=torch.float64):
    return AddInverse()(torch.rand(n, 3, size, size, dtype=dtype))


class UserNet(nn.Module):
    """Residual, concat, functional SE gate, depthwise conv, functional relu / max-pool, Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.branch = nn.Conv2d(16, 8, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = self.pw(F.relu(self.dw(x)))
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        x = x + y * s
        x = F.max_pool2d(x, 2)
        x = torch.cat([x, self.branch(x)], 1)
        return self.fc(self.drop(x.mean((2, 3))))


def test_user_model():
    model = convert_to_bcos(UserNet())
    assert isinstance(model.stem, BcosConv2d) and model.stem.in_channels == 6
    assert isinstance(model.bn, nn.Identity)
    assert isinstance(model.fc, BcosClassifier) and model.fc.logit.bias == pytest.approx(-math.log(9))
    gates = [m for m in model.modules() if isinstance(m, DynamicGate)]
    assert len(gates) == 1 and gates[0].gate_fn is torch.sigmoid
    assert unconverted_modules(model) == []
    assert isinstance(model, timm_bcos.convert.BcosModelMixin) and type(model).__name__ == 'BcosUserNet'
    model = model.double()
    for training in (True, False):  # the rewritten forward exists for both modes
        model.train(training)
        assert model(_x()).shape == (2, 10)
    assert model.check_dynamic_linearity(_x(4)) < 1e-10
    with model.explanation_mode():
        assert gates[0].detach_dynamic


def test_user_model_rewrites_functional_ops():
    # The converted forward must not apply relu or max-pool any more: compare to a hand-written
    # B-cos version of UserNet with the same layers.
    model = convert_to_bcos(UserNet()).double().eval()
    x = _x()

    def manual(x):
        h = model.stem(x)
        y = model.pw(model.dw(h))
        s = torch.sigmoid(model.se_expand(model.se_reduce(y.mean((2, 3), keepdim=True))))
        h = F.avg_pool2d(h + y * s, 2)
        h = torch.cat([h, model.branch(h)], 1)
        return model.fc(h.mean((2, 3)))

    assert torch.allclose(model(x), manual(x), rtol=1e-12, atol=0)


class Square(nn.Module):
    def forward(self, x):
        return x * x


class PadConstant(nn.Module):
    def forward(self, x):
        return F.pad(x, (1, 1, 1, 1), value=1.0)  # an added constant is a bias (removed); a padded one is not


class Exponential(nn.Module):
    def forward(self, x):
        return x.exp()


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize('bad,match', [
    (Square(), r"fx node 'mul'\) at 'block'.*two input-dependent"),
    (PadConstant(), r"pad.*at 'block'.*non-zero constant is affine"),
    (Exponential(), r"exp.*at 'block'.*not known to be linear"),
    (DataDependent(), r"DataDependent at 'block'.*torch.fx cannot trace"),
])
def test_unsupported_raises_with_path(bad, match):
    model = nn.Sequential()
    model.add_module('conv', nn.Conv2d(3, 4, 3))
    model.add_module('block', bad)
    with pytest.raises(UnsupportedModuleError, match=match) as info:
        convert_to_bcos(model)
    assert info.value.path == 'block'
    assert 'Supported:' in str(info.value)


def test_non_strict_warns_and_keeps():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Square())
    with pytest.warns(UserWarning, match='adding|two input-dependent'):
        model = convert_to_bcos(model, strict=False)
    assert isinstance(model[0], BcosConv2d)


class InlineReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)) * torch.sigmoid(x.mean((2, 3), keepdim=True))  # rewritten: gate, relu


class AbsBlock(nn.Module):
    def forward(self, x):
        return x.abs()  # no dynamic-linear form


def _half_convertible():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), InlineReLU(), nn.MaxPool2d(2), AbsBlock(),
                         nn.Flatten(), nn.Linear(196, 5))


def test_failed_conversion_leaves_the_model_as_it_was():
    model = _half_convertible().eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before_out = model(x)
    before = (repr(model), {k: v.clone() for k, v in model.state_dict().items()}, type(model))
    with pytest.raises(UnsupportedModuleError, match="at '5'"):
        convert_to_bcos(model)  # the first five modules were converted and rewritten before '5' failed
    assert (repr(model), type(model)) == (before[0], before[2])
    assert all(torch.equal(v, before[1][k]) for k, v in model.state_dict().items()) and model.state_dict().keys() == \
        before[1].keys()
    assert not any('forward' in vars(m) or hasattr(m, 'bcos_gate_0') for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before_out)


def test_non_strict_model_says_on_every_explain_that_it_is_not_exact():
    with pytest.warns(UserWarning, match='not known to be linear'):
        model = convert_to_bcos(_half_convertible(), strict=False)
    (found,) = model.bcos_cfg['unconverted']
    assert 'abs' in found and "at '5'" in found
    x = torch.rand(2, 3, 16, 16)
    for _ in range(2):
        with pytest.warns(UserWarning, match=r"not an exact explanation: 1 part\(s\) of the model were left "
                                             r"unconverted.*at '5'"):
            e = model.explain(x)
        assert not e.exact and 'unconverted' in e.warning
    exact = convert_to_bcos(UserNet())
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert exact.explain(torch.rand(2, 3, 32, 32)).exact


def test_convert_needs_a_network():
    with pytest.raises(TypeError, match=r"expects a network \(an nn.Module\), got str \(build it first: "
                                        r"timm.create_model\('resnet18'\)\)"):
        convert_to_bcos('resnet18')
    model = convert_to_bcos(UserNet())
    with pytest.raises(TypeError, match='already a B-cos network'):
        convert_to_bcos(model)


def test_bad_arguments():
    with pytest.raises(ValueError, match='norm'):
        convert_to_bcos(UserNet(), norm='batch')
    with pytest.raises(ValueError, match='head'):
        convert_to_bcos(UserNet(), head='mlp')
    with pytest.raises(TypeError, match='single Conv2d'):
        convert_to_bcos(nn.Conv2d(3, 4, 3))


def test_timm_api_is_kept():
    model = convert_to_bcos(timm.create_model('resnet18', num_classes=7))
    cfg = model.pretrained_cfg
    assert cfg['input_size'][0] == 6 and cfg['mean'] == (0.0,) and cfg['std'] == (1.0,)
    assert cfg['first_conv'] == 'conv1' and model.conv1.in_channels == 6
    assert isinstance(model.get_classifier(), BcosClassifier)
    x = _x(dtype=torch.float32)
    feats = model.forward_features(x)
    assert feats.shape[:2] == (2, 512)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 512)
    assert model.forward_head(feats).shape == (2, 7)
    model.reset_classifier(3)
    assert isinstance(model.get_classifier(), BcosClassifier)
    assert model.get_classifier().logit.bias == pytest.approx(-math.log(2))
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)


def test_conv_head():
    model = convert_to_bcos(timm.create_model('resnet18', num_classes=5), head='conv', max_out=1)
    assert isinstance(model.fc, BcosConvClassifier) and model.fc.fc.kernel_size == (1, 1)
    model = model.double()
    assert model(_x()).shape == (2, 5)
    assert model.check_dynamic_linearity(_x()) < 1e-10
    with pytest.raises(UnsupportedModuleError, match="head='conv'"):
        convert_to_bcos(UserNet(), head='conv')


def test_bnu_norm():
    model = convert_to_bcos(timm.create_model('resnet18', num_classes=5), norm='bnu', max_out=1, calibrate=False)
    norms = [m for m in model.modules() if isinstance(m, timm_bcos.BatchNormUncentered2d)]
    assert len(norms) == 20 and unconverted_modules(model) == []
    assert all(m.scale == 1.0 for m in model.modules() if isinstance(m, BcosConv2d))
    model = model.double()
    model.train()
    for _ in range(2):  # calibrate running statistics
        model(_x(8))
    assert model.check_dynamic_linearity(_x()) < 1e-10


def test_stem_after_space_to_depth_takes_the_encoding_of_each_block():
    """TResNet's stem conv takes a 4x4 space-to-depth of the image (16 x 3 channels): it now takes 16 x 6."""
    from timm.layers import SpaceToDepth
    net = nn.Sequential(SpaceToDepth(4), nn.Conv2d(48, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model = convert_to_bcos(net, calibrate=False)
    assert model[1].in_channels == 96
    assert model.double().check_dynamic_linearity(_x()) < 1e-10


def test_conv2d_same_and_dtype_kept():
    model = convert_to_bcos(timm.create_model('tf_efficientnet_b0', num_classes=4).double())
    assert type(model.conv_stem).__name__ == 'BcosConv2dSame'
    assert next(model.parameters()).dtype == torch.float64
    assert model.check_dynamic_linearity(_x(size=33)) < 1e-10


@pytest.mark.parametrize('make', [lambda: timm.create_model('resnet18', num_classes=10),
                                  lambda: nn.Sequential(nn.Conv2d(3, 4, 3), InlineReLU(), nn.AdaptiveAvgPool2d(1),
                                                        nn.Flatten(), nn.Linear(4, 5))],
                         ids=['timm_resnet18', 'rewritten_forward'])
def test_converted_models_pickle_and_deepcopy(make, tmp_path):
    """The generated Bcos<Class> and the fx-rewritten forwards survive torch.save/load, pickle and deepcopy."""
    import copy
    import pickle

    from timm_bcos.convert.rewrite import RewrittenForward

    torch.manual_seed(0)
    model = convert_to_bcos(make()).eval()
    rewritten = [m for m in model.modules() if any(isinstance(v, RewrittenForward) for v in vars(m).values())]
    assert len(rewritten) == (1 if isinstance(model, nn.Sequential) else 0)
    x = _x(dtype=torch.float32)
    torch.save(model, tmp_path / 'model.pt')
    copies = [torch.load(tmp_path / 'model.pt', weights_only=False), pickle.loads(pickle.dumps(model)),
              copy.deepcopy(model)]
    with torch.no_grad():
        reference = model(x)
    for other in copies:
        assert type(other) is type(model) and isinstance(other, timm_bcos.convert.BcosModelMixin)
        with torch.no_grad():
            assert torch.equal(other.eval()(x), reference)
        assert torch.equal(other.explain(x).weights, model.explain(x).weights)
        other.train()  # the rewritten forwards follow the copy's own mode
        assert all(m.training for m in other.modules())


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        t, _ = self.attn(t, t, t)
        return self.head(t.mean(1))


def test_non_strict_keeps_an_unsupported_module_whole():
    """nn.MultiheadAttention uses its out_proj's weight directly: converting that child alone broke
    the first forward ("BcosClassifier expects 8 input channels"); the module is now left whole."""
    with pytest.warns(UserWarning, match="at 'attn'"):
        model = convert_to_bcos(Attention(), strict=False)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model.conv, BcosConv2d) and isinstance(model.head, BcosClassifier)
    x = torch.rand(2, 3, 8, 8)
    assert model(timm_bcos.add_inverse(x)).shape == (2, 5)
    with pytest.warns(UserWarning, match='not an exact explanation'):
        assert not model.explain(x).exact


class SoftmaxGates(nn.Module):
    """Gates that take more than their input: softmax over a dim (function and method), a method sigmoid."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        x = x * F.softmax(self.gate(x), dim=1)
        x = x * self.gate(x).softmax(dim=-1)
        return x * self.gate(x).mean((2, 3), keepdim=True).sigmoid()


def test_gates_keep_their_arguments_and_work_right_after_conversion(tmp_path):
    """The rebuilt softmax gate dropped its dim (botnet26t, levit crashed on the first forward)."""
    import pickle

    model = convert_to_bcos(nn.Sequential(SoftmaxGates(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
    gates = [m for m in model.modules() if isinstance(m, DynamicGate)]
    assert len(gates) == 3
    x = _x(dtype=torch.float32).requires_grad_()
    model(x).sum().backward()  # a forward and a backward right after conversion
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert model.double().check_dynamic_linearity(_x()) < 1e-10
    copy = pickle.loads(pickle.dumps(model))  # method gates pickle too
    x = _x()
    with torch.no_grad():
        assert torch.equal(copy(x), model(x))
