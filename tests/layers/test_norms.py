"""Uncentered bias-free norms: equality with B-cos v2, checkpoints, dynamic linearity, numerics, errors."""
import copy
import warnings

import pytest
import torch

from timm_bcos.layers import explanation_mode
from timm_bcos.layers.norm import BatchNormUncentered2d, GroupNormUncentered, LayerNorm2dUncentered, LayerNormUncentered

with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    from bcos.modules import norms as ref_norms

C = 8
DTYPES = [torch.float32, torch.float64]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _input(dtype=torch.float32, n=4, c=C, h=5, w=6):
    # a non-zero mean per channel, so that centering would make a difference
    return (torch.randn(n, c, h, w, dtype=dtype) * torch.rand(1, c, 1, 1, dtype=dtype) * 3
            + torch.randn(1, c, 1, 1, dtype=dtype))


def _pair(kind, dtype=torch.float32, **kwargs):
    """(ours, v2's NoBias equivalent) with the same random weight, v2's state loaded strictly."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if kind == 'bn':
            ref = ref_norms.NoBias(ref_norms.BatchNormUncentered2d)(C, **kwargs)
            ours = BatchNormUncentered2d(C, **kwargs)
        elif kind == 'gn':
            groups = kwargs.pop('num_groups', 2)
            ref = ref_norms.NoBias(ref_norms.GroupNormUncentered2d)(groups, C, **kwargs)
            ours = GroupNormUncentered(groups, C, **kwargs)
        else:
            ref = ref_norms.NoBias(ref_norms.PositionNormUncentered2d)(C, eps=1e-6, **kwargs)
            ours = LayerNorm2dUncentered(C, **kwargs)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.to(dtype), ref.to(dtype)


def _compare_step(ours, ref, x, grad):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    assert y1.dtype == y2.dtype == x.dtype
    assert _rel(y1, y2) < 1e-5
    y1.backward(grad)
    y2.backward(grad)
    assert _rel(x1.grad, x2.grad) < 1e-5
    assert _rel(ours.weight.grad, ref.weight.grad) < 1e-5
    ours.zero_grad()
    ref.zero_grad()


# --- equality with the bcos package (B-cos v2) ------------------------------------------------

@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('momentum,track', [(0.1, True), (None, True), (0.1, False)])
def test_batchnorm_equals_reference(dtype, momentum, track):
    ours, ref = _pair('bn', dtype, momentum=momentum, track_running_stats=track)
    for _ in range(3):
        x = _input(dtype)
        _compare_step(ours, ref, x, torch.randn_like(x))
    if track:
        assert _rel(ours.running_var, ref.running_var) < 1e-5
        assert torch.equal(ours.running_mean, ref.running_mean)  # v2 never updates it
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
        # v2 tracks the biased batch variance, not torch BN's unbiased one
        assert not torch.allclose(ours.running_var, torch.ones_like(ours.running_var))
    ours.eval(), ref.eval()
    x = _input(dtype)
    _compare_step(ours, ref, x, torch.randn_like(x))


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('kind,kwargs', [('gn', {'num_groups': 1}), ('gn', {'num_groups': 2}),
                                         ('gn', {'num_groups': C}), ('ln', {})])
def test_group_and_layer_norm_equal_reference(dtype, kind, kwargs):
    ours, ref = _pair(kind, dtype, **kwargs)
    for train in (True, False):
        ours.train(train), ref.train(train)
        x = _input(dtype)
        _compare_step(ours, ref, x, torch.randn_like(x))


@pytest.mark.parametrize('kind', ['bn', 'gn', 'ln'])
def test_reference_state_dict_loads_strictly(kind):
    ours, ref = _pair(kind)
    for _ in range(2):  # give v2's BN non-trivial running stats
        ref(_input())
    ref.eval(), ours.eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = _input()
    with torch.no_grad():
        assert _rel(ours(x), ref(x)) < 1e-6
    ref.load_state_dict(ours.state_dict(), strict=True)  # and back
    # a bias (v2 without NoBias) belongs to a different function: refuse it
    with pytest.raises(RuntimeError, match='bias'):
        ours.load_state_dict({**ref.state_dict(), 'bias': torch.zeros(C)}, strict=True)


# --- explanation mode: dynamic linearity (§3.2.1) ---------------------------------------------

LAYERS = {
    'bn_eval': lambda: BatchNormUncentered2d(C).eval(),
    'bn_train': lambda: BatchNormUncentered2d(C),
    'bn_untracked': lambda: BatchNormUncentered2d(C, track_running_stats=False).eval(),
    'gn': lambda: GroupNormUncentered(2, C),
    'ln': lambda: LayerNorm2dUncentered(C),
}


@pytest.mark.parametrize('name', list(LAYERS))
def test_explanation_mode_is_dynamic_linear(name):
    layer = LAYERS[name]().double()
    if name == 'bn_eval':  # non-trivial running stats
        layer.running_var.uniform_(0.5, 4.0)
    with torch.no_grad():
        layer.weight.uniform_(-2.0, 2.0)
    x = _input(torch.float64).requires_grad_()
    y_plain = layer(x)
    with explanation_mode(layer):
        y = layer(x)
    assert torch.equal(y, y_plain)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g * x, y, rtol=1e-12, atol=1e-12 * y.abs().max().item())
    if name in ('bn_train', 'bn_untracked', 'gn', 'ln'):  # the plain gradient includes the divisor's
        (g_plain,) = torch.autograd.grad(y_plain.sum(), x)
        assert not torch.allclose(g_plain * x, y)


# --- numerics ------------------------------------------------------------------------------

def _wide_range_input(dtype):
    x = torch.randn(4, C, 5, 6).sign() * 10 ** torch.empty(4, C, 5, 6).uniform_(-3, 3)
    x[:, 0] = 1e3  # a constant channel: zero batch variance
    x[:, 1] = torch.randn(4, 5, 6).sign() * 1e3  # variance 1e6: overflows a float16 variance
    x[0, :, 0, 0] = 0
    x[1] = 0  # an all-zero sample: zero variance for the group and position norms
    return x.to(dtype).requires_grad_()


@pytest.mark.parametrize('amp_dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('name', list(LAYERS))
def test_autocast_finite_and_accurate(amp_dtype, name):
    layer = LAYERS[name]()
    for x in (_wide_range_input(amp_dtype), torch.zeros(4, C, 5, 6, dtype=amp_dtype, requires_grad=True)):
        exact = copy.deepcopy(layer).double()
        x64 = x.detach().double().requires_grad_()
        with torch.autocast('cpu', dtype=amp_dtype):
            y = layer(x)
        y64 = exact(x64)
        assert y.dtype == torch.float32  # like autocast's layer_norm / group_norm
        assert torch.isfinite(y).all()
        grad = torch.randn_like(y64)
        y.backward(grad.float())
        y64.backward(grad)
        assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
        if x.any():  # not silently zero: the float64 result up to float32 rounding (and the input's for grads)
            assert _rel(y, y64) < 1e-5
            assert _rel(x.grad, x64.grad) < 1e-2 and _rel(layer.weight.grad, exact.weight.grad) < 1e-4
        else:
            assert (y == 0).all()
        layer.zero_grad()
    if name == 'bn_train':
        assert torch.isfinite(layer.running_var).all()


@pytest.mark.parametrize('name', list(LAYERS))
def test_zero_input(name):
    layer = LAYERS[name]()
    x = torch.zeros(2, C, 3, 3, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


def test_output_dtype_without_autocast():
    for layer in (BatchNormUncentered2d(C), GroupNormUncentered(2, C), LayerNorm2dUncentered(C)):
        assert layer.half()(_input().half()).dtype == torch.float16
        assert layer.double()(_input(torch.float64)).dtype == torch.float64


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize('layer', [BatchNormUncentered2d(C), GroupNormUncentered(2, C), LayerNorm2dUncentered(C)],
                         ids=['bn', 'gn', 'ln'])
def test_input_errors(layer):
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf'{name} expects a 4-D input .* got shape \(2, {C}, 5\)'):
        layer(torch.randn(2, C, 5))
    with pytest.raises(ValueError, match=rf'{name} expects a 4-D input .* got shape \(2, {C}, 3, 3, 3\)'):
        layer(torch.randn(2, C, 3, 3, 3))
    with pytest.raises(ValueError, match=rf'{name} expects {C} channels, got {C // 2}'):
        layer(torch.randn(2, C // 2, 3, 3))


def test_group_count_error():
    with pytest.raises(ValueError, match=r'num_channels \(6\) must be divisible by num_groups \(4\)'):
        GroupNormUncentered(4, 6)


def test_layer_norm_uncentered_is_the_channels_last_layer_norm_2d():
    norm2d = LayerNorm2dUncentered(4).double()
    torch.nn.init.normal_(norm2d.weight)
    norm = LayerNormUncentered(4).double()
    norm.load_state_dict(norm2d.state_dict())
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    assert torch.equal(norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), norm2d(x))
    with pytest.raises(ValueError, match='4 features in the last dimension'):
        norm(x)
