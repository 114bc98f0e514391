"""The general rules that let the converter handle (nearly) every timm CNN family: fixed filters,
list inputs, drop-path, biases, gates through linear ops and ratios (GRN), clipped gates (StarNet),
CondConv, powers.

Each rule: a small synthetic module converts exactly (Eq. 13 in float64) and a non-linear variant is
still refused with a specific reason; then the timm models that needed it convert exactly and train
(a forward and a backward right after conversion).
"""
from typing import List

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import CondConv2d, drop_path
from timm.layers.padding import pad_same
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from timm_bcos import AddInverse, BcosConv2d, DynamicGate, UnsupportedModuleError, convert_to_bcos
from timm_bcos.convert import unconverted_modules
from timm_bcos.evaluation.coverage import dynamic_gates
from timm_bcos.layers import BcosCondConv2d


pytestmark = pytest.mark.usefixtures('one_thread')


def _x(n=2, size=8):
    return AddInverse()(torch.rand(n, 3, size, size, dtype=torch.float64))


def _net(*blocks: nn.Module, width: int = 4) -> nn.Module:
    """stem conv -> blocks -> pool -> linear head."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 3))


def _convert_exact(model: nn.Module, size: int = 8) -> nn.Module:
    """Convert, train step right after conversion, then Eq. 13 in float64."""
    model = convert_to_bcos(model, calibrate=False)
    x = _x(size=size).float().requires_grad_()
    model.train()(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    model = model.double()
    assert model.check_dynamic_linearity(_x(size=size)) < 1e-10
    return model


def _refused(model: nn.Module, match: str, **kwargs) -> UnsupportedModuleError:
    with pytest.raises(UnsupportedModuleError, match=match) as info:
        convert_to_bcos(model, calibrate=False, **kwargs)
    return info.value


class FixedBlur(nn.Module):
    """A binomial blur as a functional conv with a constant buffer kernel (timm's BlurPool2d)."""

    def __init__(self, channels=4, learned=False, bias=False):
        super().__init__()
        kernel = torch.tensor([1., 2., 1.])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(channels, 1, 3, 3).clone()
        if learned:
            self.filt = nn.Parameter(kernel)
        else:
            self.register_buffer('filt', kernel)
        self.register_buffer('offset', torch.ones(channels) if bias else None)

    def forward(self, x):
        x = F.pad(x, (1, 1, 1, 1), mode='reflect')
        return F.conv2d(x, self.filt, self.offset, stride=2, groups=x.shape[1])


class InputFilter(nn.Module):
    def forward(self, x):
        return F.conv2d(x, x[:1].mean(1, keepdim=True).expand(x.shape[1], 1, 3, 3).contiguous(), groups=x.shape[1])


def test_fixed_filters_are_linear_learned_ones_refused():
    model = _convert_exact(_net(FixedBlur()))
    assert isinstance(model[0], BcosConv2d)
    model = _convert_exact(_net(FixedBlur(bias=True)))  # its constant bias is removed
    assert model[1](torch.zeros(1, 4, 6, 6, dtype=torch.float64)).abs().max() == 0
    _refused(_net(FixedBlur(learned=True)), r"conv2d.*at '1'.*learned weight \(a Parameter\)")
    _refused(_net(InputFilter()), r"conv2d.*at '1'.*weight depends on the input")


class AppendList(nn.Sequential):
    """vovnet's SequentialAppendList: appends to a list it is given, then concatenates it."""

    def forward(self, x, concat_list: List[torch.Tensor]):
        for i, module in enumerate(self):
            concat_list.append(module(x if i == 0 else concat_list[-1]))
        return torch.cat(concat_list, dim=1)


class Aggregate(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.convs = AppendList(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 1))
        self.concat = nn.Conv2d(4 * width, width, 1)

    def forward(self, x):
        return self.concat(self.convs(x, [x]))


class ListBlock(nn.Module):
    """selecsls' block: takes [x, skip] (or [x]) and indexes it; fx cannot trace it with a tensor input."""

    def __init__(self, width=4, act=False):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.act = act

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        if not isinstance(x, list):
            x = [x]
        y = self.conv(x[0]) + x[1] if len(x) > 1 else self.conv(x[0])
        return [F.relu(y) if self.act else y, x[-1]]


class First(nn.Module):
    def forward(self, x):
        return x[0]


def test_list_inputs():
    _convert_exact(_net(Aggregate()))
    _convert_exact(_net(ListBlock(), ListBlock(), First()))
    _refused(_net(ListBlock(act=True), First()), r"ListBlock.forward at '1'.*traced with list inputs")


class PartialConv(nn.Module):
    """fasternet's Partial_conv3: the forward is chosen per instance (``self.forward = ...``)."""

    def __init__(self, into_constant=False):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.forward = self.forward_into_zeros if into_constant else self.forward_split_cat

    def forward_split_cat(self, x):
        x1, x2 = torch.split(x, [2, 2], dim=1)
        return torch.cat((self.conv(x1), x2), 1)

    def forward_into_zeros(self, x):
        y = x.new_ones(x.shape)
        y.add_(x)
        return y


def test_instance_forwards_and_in_place_writes():
    _convert_exact(_net(PartialConv()))
    _refused(_net(PartialConv(into_constant=True)), r"add_.*at '1'.*in place into a constant tensor")


class DropPathBlock(nn.Module):
    def __init__(self, width=4, p=0.5):
        super().__init__()
        self.conv, self.p = nn.Conv2d(width, width, 3, padding=1), p

    def forward(self, x):
        return x + drop_path(self.conv(x), self.p, self.training)


class RandomInput(nn.Module):
    def forward(self, x):
        return x * torch.bernoulli(x.sigmoid().mean() + 0 * x)


def test_functional_drop_path_is_linear():
    model = _convert_exact(_net(DropPathBlock()))
    x = _x(8)
    outs = [model.train()(x) for _ in range(4)]  # the per-sample mask is still drawn in training
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    _refused(_net(RandomInput()), r"bernoulli.*at '1'.*not known to be linear")  # a mask drawn from x


class Affine(nn.Module):
    """hgnetv2's LearnableAffineBlock, mobileone's ``x + 0``, a constant minus x, a scaled add."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([2.0]))
        self.bias = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x):
        y = self.scale * x + self.bias
        y = y + 0
        y = 1.0 - y
        return torch.add(3.0, y, alpha=2.0)


class BiasInGate(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True) + 3.0)


class ExpOfBias(nn.Module):
    def forward(self, x):
        return torch.exp(x + 1)


def test_biases_are_removed_exactly():
    model = _convert_exact(_net(Affine()))
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert torch.allclose(model[1](x), -4 * x, rtol=1e-14)  # 2 * -(2x)
    assert model[1].bias.grad is None  # the removed bias is not used
    gate = _convert_exact(_net(BiasInGate()))[1]  # a gate's own constants stay
    assert torch.allclose(gate(x), x * torch.sigmoid(x.mean((2, 3), keepdim=True) + 3), rtol=1e-14)
    _refused(_net(ExpOfBias()), r"exp.*at '1'.*not known to be linear")


class InterpolatedGate(nn.Module):
    """ghostnetv2: the sigmoid of a pooled branch, upsampled, gates the full-resolution features."""

    def __init__(self, width=4, squash=True, leak=False):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 1)
        self.squash, self.leak = squash, leak

    def forward(self, x):
        g = self.conv(F.avg_pool2d(x, 2))
        g = F.interpolate(torch.sigmoid(g) if self.squash else g, size=(x.shape[-2], x.shape[-1]), mode='nearest')
        return x * g + g if self.leak else x * g


class ExpandedGate(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True)).expand_as(x)  # x gives the gate only its shape


def test_gates_through_linear_ops():
    model = _convert_exact(_net(InterpolatedGate()))
    assert len([n for n, _ in model.named_modules() if 'bcos_gate' in n]) == 1
    assert _convert_exact(_net(ExpandedGate()))[1].bcos_gate_0.gate_fn is torch.sigmoid
    _refused(_net(InterpolatedGate(squash=False)), r"at '1'.*two input-dependent")
    _refused(_net(InterpolatedGate(leak=True)), r"at '1'.*two input-dependent")  # a gate also used as a term


class StarBlock(nn.Module):
    """StarNet: ``act(f1(x)) * f2(x)``: the side with the activation is the gate."""

    def __init__(self, width=4, act=nn.ReLU6):
        super().__init__()
        self.f1, self.f2, self.act = nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 1), act()

    def forward(self, x):
        return self.act(self.f1(x)) * self.f2(x) + F.hardtanh(x, -2, 2) * x


def test_clipped_activations_are_gates():
    model = _convert_exact(_net(StarBlock()))
    assert sorted(n for n, m in model.named_modules() if isinstance(m, DynamicGate)) == ['1.act', '1.bcos_gate_0']
    # f1 only feeds the gate (its value is detached when explaining): a gate branch, listed with the gates
    assert model.bcos_cfg['gate_branches'] == ['1.f1'] and '1.f1' not in dict(dynamic_gates(model))  # a B-cos conv
    starnet = convert_to_bcos(timm.create_model('starnet_s050', num_classes=5), calibrate=False)
    assert type(starnet.stages[0][1].f1.conv) is nn.Conv2d  # StarNet's ConvBN gate branch is kept as it was
    assert unconverted_modules(starnet) == [] and ('stages.0.1.f1', 'branch ConvBN') in dynamic_gates(starnet)
    _refused(_net(StarBlock(act=nn.GELU)), r"at '1'.*two input-dependent.*bounded activation", gate_rule='bounded')


class GluBlock(nn.Module):
    """``a(x) * b(x)`` with a non-linearity on the `gate` side's own branch (GLU, gMLP, FocalNet)."""

    def __init__(self, width=4, gate='act'):
        super().__init__()
        self.f1, self.f2, self.gate = nn.Conv2d(width, width, 1), nn.Conv2d(width, 2 * width, 1), gate
        self.inner = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU())
        self.norm, self.h = nn.GroupNorm(1, width), nn.Conv2d(width, width, 1)

    def forward(self, x):
        u, v = self.f2(x).chunk(2, dim=1)
        if self.gate == 'act':  # GEGLU: gelu(v) * u
            return F.gelu(v) * u
        if self.gate == 'norm':  # gMLP's spatial gating unit: u * proj(norm(v))
            return u * self.h(self.norm(v))
        if self.gate == 'deep':  # FocalNet's modulator: the non-linearity inside a module, then linear ops
            return self.f1(x) * self.h(self.inner(v) * u.mean((2, 3), keepdim=True))
        if self.gate == 'both':
            return F.gelu(u) * F.silu(v)
        return self.f1(x) * v  # neither side


@pytest.mark.parametrize('gate', ['act', 'norm', 'deep'])
def test_nonlinear_side_of_a_product_is_a_gate(gate):
    model = _convert_exact(_net(GluBlock(gate=gate)))
    x = _x()
    with model.explanation_mode():
        x.requires_grad_()
        logit = model(x)[:, 0].sum()
        w, = torch.autograd.grad(logit, x)
    assert torch.allclose((w * x).sum((1, 2, 3)) + model.bcos_cfg['logit_bias'], model(x)[:, 0].detach(), atol=1e-10)
    wrapped = {n: type(m.gate).__name__ if hasattr(m, 'gate') else m.gate_fn.__name__
               for n, m in model.named_modules() if isinstance(m, DynamicGate)}
    expected = {'act': {'1.bcos_gate_0': 'gelu'}, 'norm': {'1.h': 'Conv2d'},
                'deep': {'1.h': 'Conv2d', '1.inner': 'Sequential'}}  # inner(v) * mean(u): a gate inside a gate
    assert wrapped == expected[gate]
    _refused(_net(GluBlock(gate=gate)), r"at '1'.*two input-dependent", gate_rule='bounded')


@pytest.mark.parametrize('gate', ['both', 'neither'])
def test_products_with_no_single_nonlinear_side_are_refused(gate):
    _refused(_net(GluBlock(gate=gate)), r"at '1'.*two input-dependent.*activation or a norm on one side only")


class GRNBlock(nn.Module):
    def __init__(self, width=4, ratio=True):
        super().__init__()
        self.grn = GlobalResponseNorm(width, channels_last=False)
        nn.init.normal_(self.grn.weight)
        nn.init.normal_(self.grn.bias)
        self.ratio = ratio

    def forward(self, x):
        return self.grn(x) if self.ratio else x * x.norm(dim=(2, 3), keepdim=True)


def test_grn_is_a_gate_and_its_beta_a_bias():
    grn = _convert_exact(_net(GRNBlock()))[1].grn
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    g = x.norm(dim=(2, 3), keepdim=True)
    expected = x + grn.weight.view(1, -1, 1, 1) * x * (g / (g.mean(1, keepdim=True) + grn.eps))
    assert torch.allclose(grn(x), expected, rtol=1e-12)  # without beta
    _refused(_net(GRNBlock(ratio=False)), r"norm.*at '1'.*not known to be linear")  # x * ||x||: not a ratio


class CondBlock(nn.Module):
    def __init__(self, width=4, experts=3, padding=1, stride=1):
        super().__init__()
        self.routing_fn = nn.Linear(width, experts)
        self.conv = CondConv2d(width, width, 3, stride, padding=padding, num_experts=experts, groups=2)

    def forward(self, x):
        routing = torch.sigmoid(self.routing_fn(x.mean((2, 3))))
        return self.conv(x, routing)


@pytest.mark.parametrize('padding,stride', [(1, 1), ('same', 2)])  # 'same' with stride 2: dynamic padding
def test_cond_conv(padding, stride):
    block = _convert_exact(_net(CondBlock(padding=padding, stride=stride)))[1]
    conv = block.conv
    assert isinstance(conv, BcosCondConv2d) and conv.same_padding == (padding == 'same')
    assert block.bcos_gate_0.gate_fn is torch.sigmoid  # the routing's sigmoid is kept
    # oracle: sample by sample, a BcosConv2d with the mixed weight
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    routing = torch.rand(3, 3, dtype=torch.float64)
    single = BcosConv2d(4, 4, 3, stride, padding=0 if conv.same_padding else 1, groups=2, b=conv.b,
                        max_out=conv.max_out, scale=conv.scale).double()
    outs = []
    for i in range(3):
        single.weight.data = torch.einsum('e,e...->...', routing[i], conv.weight)
        xi = pad_same(x[i:i + 1], (3, 3), (stride, stride)) if conv.same_padding else x[i:i + 1]
        outs.append(single(xi))
    assert torch.allclose(conv(x, routing), torch.cat(outs), rtol=1e-12, atol=1e-14)


class StarReLU(nn.Module):
    """metaformer's StarReLU ``s * relu(x) ** 2 + b``; or ``x ** x``."""

    def __init__(self, exponent_from_input=False):
        super().__init__()
        self.relu = nn.ReLU()
        self.scale, self.bias = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
        self.exponent_from_input = exponent_from_input

    def forward(self, x):
        y = self.relu(x)
        return self.scale * (y ** y if self.exponent_from_input else y ** 2) + self.bias


def test_powers_are_activations():
    act = _convert_exact(_net(StarReLU()))[1]
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert torch.equal(act(x), act.scale * x)
    _refused(_net(StarReLU(exponent_from_input=True)), r"pow.*at '1'.*input-dependent exponent")


class Recurrent(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.rnn = nn.LSTM(width, width, batch_first=True)

    def forward(self, x):
        y, _ = self.rnn(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(x.shape)


def test_recurrent_layers_are_refused_by_name():
    _refused(_net(Recurrent()), r"LSTM at '1.rnn'.*recurrent layer")


# The timm models that needed these rules (the module each must contain) and their smallest input size.
TIMM_MODELS = {
    'resnetblur18': ('BlurPool2d', 32),  # fixed filter
    'vovnet39a': ('SequentialAppendList', 32),  # appends to a list input
    'mobileone_s0': ('MobileOneBlock', 32),  # x + 0
    'hgnetv2_b0': ('LearnableAffineBlock', 32),  # scale * x + bias
    'ghostnetv2_100': ('GhostModuleV2', 64),  # a gate through interpolation
    'convnextv2_atto': ('GlobalResponseNorm', 32),
    'efficientnet_cc_b0_4e': ('CondConv2d', 32),
    'selecsls42b': ('SelecSlsBlock', 32),  # list inputs
    'convformer_s18': ('StarReLU', 32),  # s * relu(x) ** 2 + b
    'starnet_s050': ('ReLU6', 32),  # relu6(x1) * x2
    'tresnet_m': ('SpaceToDepth', 32),  # the stem conv takes 16 x [x, 1-x]
    'test_mambaout': ('GatedConvBlock', 32),  # act(g) * cat(i, conv(c))
}


@pytest.mark.parametrize('name', TIMM_MODELS)
def test_timm_models(name):
    needs, size = TIMM_MODELS[name]
    model = timm.create_model(name, pretrained=False, num_classes=5)
    assert needs in {type(m).__name__ for m in model.modules()}
    _convert_exact(model, size=size)


class SplitBlock(nn.Module):
    """Its forward depends on an own attribute (the split): blocks that differ in it trace differently."""

    def __init__(self, width, split):
        super().__init__()
        self.conv, self.split = nn.Conv2d(width, width, 1), split

    def forward(self, x):
        a, b = torch.split(self.conv(x), [self.split, x.shape[1] - self.split], dim=1)
        return torch.cat([b, F.relu(a)], dim=1)


def test_each_module_structure_is_traced_once(monkeypatch):
    import timm_bcos.convert.tracing as tracing
    calls = []
    real = tracing.trace_forwards
    monkeypatch.setattr(tracing, 'trace_forwards', lambda m, *a: calls.append(type(m).__name__) or real(m, *a))
    blocks = [SplitBlock(4, 1), SplitBlock(4, 1), SplitBlock(4, 1), SplitBlock(4, 3)]
    model = _convert_exact(_net(*blocks))
    assert calls.count('SplitBlock') == 4  # (split 1, split 3) x (train, eval): not 8
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for i, block in enumerate(blocks, start=1):  # each block kept its own split
        a, b = torch.split(model[i].conv(x), [block.split, 4 - block.split], dim=1)
        assert torch.equal(model[i](x), torch.cat([b, a], dim=1))
