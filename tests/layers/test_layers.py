"""B-cos layers: reference equality, exact gradients, dynamic linearity, bound, numerics, errors."""
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm_bcos
from timm_bcos import AddInverse, BcosConv2d, BcosLinear, LogitLayer, explanation_mode
from timm_bcos.layers import from_reference_layout, to_reference_layout

from digits_fit import fit_digits
from reference import naive_bcos_conv2d

with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    import bcos.modules as ref_modules
    from bcos.modules.bcosconv2d import BcosConv2dWithScale


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- reference equality with the bcos package (B-cos v2) ------------------------------------

REF_GRID = list(itertools.product([1.0, 1.25, 2.0, 2.5], [1, 2], [1, 4, 'dw'], [1, 2], [0, 1]))


@pytest.mark.parametrize('b,max_out,groups,stride,padding', REF_GRID)
def test_conv_equals_reference(b, max_out, groups, stride, padding):
    cin = 8
    groups = cin if groups == 'dw' else groups
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = ref_modules.BcosConv2d(cin, 8, 3, stride=stride, padding=padding, groups=groups, b=b, max_out=max_out)
    ours = BcosConv2d(cin, 8, 3, stride=stride, padding=padding, groups=groups, b=b, max_out=max_out, scale=None)
    with torch.no_grad():
        ours.weight.copy_(from_reference_layout(ref.linear.weight, max_out, groups))
    for dtype in (torch.float32, torch.float64):
        ref.to(dtype), ours.to(dtype)
        x = torch.randn(3, cin, 11, 11, dtype=dtype, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = ours(x), ref(x_ref)
        assert _rel(y, y_ref) < 1e-5
        grad = torch.randn_like(y)
        y.backward(grad)
        y_ref.backward(grad)
        # The reference adds 1e-6 to |cos| before the power; near cos = 0 that changes the
        # derivative of |cos|^(B-1) for B < 2 slightly, so gradients agree to 1e-4.
        assert _rel(x.grad, x_ref.grad) < 1e-4
        assert _rel(ours.weight.grad, from_reference_layout(ref.linear.weight.grad, max_out, groups)) < 1e-4
        ours.zero_grad()
        ref.zero_grad()


@pytest.mark.parametrize('b,max_out', [(1.0, 2), (2.0, 1), (2.0, 2), (2.5, 3)])
def test_unit_norm_on_weight_or_output_equals_reference(b, max_out, monkeypatch):
    """Both places for 1/||w|| (the weight, or the output per channel; chosen by shapes), each
    forced: the same outputs and gradients in float64 (1e-12), in explanation mode as well, and
    those of the reference."""
    from timm_bcos.layers import bcos_function
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        refs = [ref_modules.BcosConv2d(4, 6, 3, padding=1, groups=2, b=b, max_out=max_out).double(),
                ref_modules.BcosLinear(5, 3, b=b, max_out=max_out).double()]
    ours = [BcosConv2d(4, 6, 3, padding=1, groups=2, b=b, max_out=max_out, scale=None).double(),
            BcosLinear(5, 3, b=b, max_out=max_out, scale=None).double()]
    for ref, layer, shape, groups in zip(refs, ours, [(2, 4, 5, 5), (3, 5)], [2, 1]):
        with torch.no_grad():
            layer.weight.copy_(from_reference_layout(ref.linear.weight, max_out, groups))
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        y_ref = ref(x)
        grad = torch.randn_like(y_ref)
        ref_grads = torch.autograd.grad(y_ref, (x, ref.linear.weight), grad)
        for detach in (True, False):  # explanation mode too: it keeps the dynamic scale, not the output
            layer.detach_dynamic = detach
            results = []
            for scales_output in (False, True):
                monkeypatch.setattr(bcos_function, '_scales_output', lambda *args: scales_output)
                y = layer(x)
                results.append((y, *torch.autograd.grad(y, (x, layer.weight), grad)))
            for a, c in zip(*results):
                assert _rel(a, c) < 1e-12
        y, grad_x, grad_w = results[0]
        assert _rel(y, y_ref) < 1e-5  # the input-norm epsilons differ
        assert _rel(grad_x, ref_grads[0]) < 1e-4  # and the reference's |cos| + 1e-6 (see above)
        assert _rel(grad_w, from_reference_layout(ref_grads[1], max_out, groups)) < 1e-4


@pytest.mark.parametrize('groups', [1, 4])
def test_conv_with_scale_equals_reference(groups):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = BcosConv2dWithScale(16, 8, 3, padding=1, groups=groups, b=2, max_out=2)
    # v1/v2 scale k * sqrt(C_in) / 100 is our default for groups=1; grouped convs pass it explicitly.
    kwargs = {} if groups == 1 else {'scale': ref.scale}
    ours = BcosConv2d(16, 8, 3, padding=1, groups=groups, **kwargs)
    assert ours.scale == pytest.approx(ref.scale)
    with torch.no_grad():
        ours.weight.copy_(from_reference_layout(ref.linear.weight, 2, groups))
    x = torch.randn(2, 16, 9, 9)
    assert _rel(ours(x), ref(x)) < 1e-5


@pytest.mark.parametrize('b,max_out', list(itertools.product([1.0, 1.25, 2.0, 2.5], [1, 2])))
def test_linear_equals_reference(b, max_out):
    ref = ref_modules.BcosLinear(10, 7, b=b, max_out=max_out)
    ours = BcosLinear(10, 7, b=b, max_out=max_out, scale=None)
    with torch.no_grad():
        ours.weight.copy_(from_reference_layout(ref.linear.weight, max_out))
    x = torch.randn(4, 5, 10, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x_ref)
    assert y.shape == (4, 5, 7)
    assert _rel(y, y_ref) < 1e-5
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert _rel(x.grad, x_ref.grad) < 1e-4


def test_reference_layout_round_trip():
    w = torch.randn(24, 3, 3, 3)
    for m, g in [(1, 1), (2, 1), (2, 4), (3, 2)]:
        assert torch.equal(to_reference_layout(from_reference_layout(w, m, g), m, g), w)
    # unit m of output o sits at row m * O + o (one group)
    w = torch.arange(6.0).view(6, 1)  # reference rows: o * 2 + m
    assert from_reference_layout(w, 2).flatten().tolist() == [0, 2, 4, 1, 3, 5]


# --- the fused backward against the definition ----------------------------------------------

CONV_CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, groups=2),
    dict(kernel_size=(3, 5), padding=(1, 2), dilation=(2, 1)),
    dict(kernel_size=3, padding=2, padding_mode='reflect'),
    dict(kernel_size=3, padding=1, padding_mode='circular', groups=4),
    dict(kernel_size=3, padding=1, padding_mode='replicate', stride=2),
    dict(kernel_size=4, padding='same'),
    dict(kernel_size=1),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=3, padding=3, dilation=3),
    dict(kernel_size=3, groups=4, padding=1),  # depthwise: 4 in, 4 groups
]


@pytest.fixture(params=['fused', 'custom_op', 'traceable'])
def bcos_path(request, monkeypatch):
    """Every implementation of the transform: the eager autograd Function, and under torch.compile /
    torch.export (whenever `torch.compiler.is_compiling()`) the same code as custom ops or the plain
    ops the compiler fuses (`_compiles_as_custom_op` picks by device and MaxOut; here forced)."""
    from timm_bcos.layers import bcos_function
    if request.param != 'fused':
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
        custom = request.param == 'custom_op'
        monkeypatch.setattr(bcos_function, '_compiles_as_custom_op', lambda x, max_out: custom)
    return request.param


@pytest.mark.parametrize('case', CONV_CASES, ids=[str(c) for c in CONV_CASES])
@pytest.mark.parametrize('b,max_out', [(1.0, 2), (1.5, 1), (2.0, 2), (2.5, 3)])
def test_conv_matches_definition_and_gradcheck(case, b, max_out, bcos_path):
    layer = BcosConv2d(4, 8, b=b, max_out=max_out, **case).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    for detach in (False, True):
        layer.detach_dynamic = detach
        y = layer(x)
        y_ref = naive_bcos_conv2d(x, layer, detach=detach)
        assert y.shape == y_ref.shape
        assert _rel(y, y_ref) < 1e-12
        grad = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, layer.weight), grad)
        gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, layer.weight), grad)
        assert _rel(gx, gx_ref) < 1e-10
        assert _rel(gw, gw_ref) < 1e-10
    layer.detach_dynamic = False
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize('chunk_bytes', [None, 1])
@pytest.mark.parametrize('max_out,b', [(2, 2.0), (3, 1.0), (1, 2.5)])
def test_custom_ops_pass_opcheck(max_out, b, chunk_bytes, monkeypatch):
    """The custom ops that torch.compile runs on CPU: schema, fake (meta) implementations, autograd
    registration and AOT dispatch, as torch.library checks them, for a conv and a linear geometry;
    also with explanation-mode convolutions run one image at a time (real tensors only)."""
    from timm_bcos.layers import bcos_function
    from timm_bcos.layers.bcos_function import _bcos_forward_op
    from timm_bcos.layers.bcos_geometry import ConvGeometry, LinearGeometry
    if chunk_bytes is not None:
        monkeypatch.setattr(bcos_function, 'CHUNK_BYTES', chunk_bytes)
    cases = [(ConvGeometry((3, 3), (2, 2), (1, 1), (1, 1), 2), (2, 6, 7, 7), (6 * max_out, 3, 3, 3)),
             # ungrouped with 6 input channels: the input gradient through GEMM + col2im (real tensors only)
             (ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1), 1), (2, 6, 7, 7), (4 * max_out, 6, 3, 3)),
             (LinearGeometry(), (5, 6), (4 * max_out, 6))]
    for geometry, x_shape, w_shape in cases:
        x = torch.randn(*x_shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(*w_shape, dtype=torch.float64, requires_grad=True)
        for detach in (False, True):
            torch.library.opcheck(_bcos_forward_op, (x, w, geometry.spec, max_out, b, 3.0, detach, torch.float64))


@pytest.mark.parametrize('cin,max_out,b', [(6, 2, 2.0), (16, 2, 2.0), (6, 3, 1.5), (16, 1, 2.0), (16, 2, 1.0)])
def test_explanation_mode_runs_large_layers_in_chunks_of_images(cin, max_out, b, bcos_path, monkeypatch):
    """In explanation mode on CPU a layer whose linear output exceeds `CHUNK_BYTES` runs over the batch
    in chunks of images, forward and input gradient (page faults: `_chunk_rows`), with the results
    of the whole batch (to rounding); not for B = 1 (nothing kept), and not for the weight gradient."""
    from timm_bcos.layers import bcos_function
    from timm_bcos.layers.bcos_geometry import ConvGeometry
    layer = BcosConv2d(cin, 8, 3, stride=2, padding=1, b=b, max_out=max_out).double()
    layer.detach_dynamic = True
    x = torch.randn(5, cin, 11, 9, dtype=torch.float64)
    convs = []
    linear = ConvGeometry.linear
    monkeypatch.setattr(ConvGeometry, 'linear', lambda self, x, w: (convs.append(len(x)), linear(self, x, w))[1])

    def run(chunk_bytes, weight_grad=False):
        monkeypatch.setattr(bcos_function, 'CHUNK_BYTES', chunk_bytes)
        layer.weight.requires_grad_(weight_grad)
        xg = x.clone().requires_grad_()
        convs.clear()
        y = layer(xg)
        grads = torch.autograd.grad(y, (xg, layer.weight) if weight_grad else (xg,), torch.cos(y))
        return y, grads, list(convs)

    whole, _, seen = run(2 ** 30)
    assert seen == [5]
    row = 8 * max_out * 6 * 5 * 8  # bytes of one image's linear output
    chunked = bcos_path != 'traceable' and b != 1
    for chunk_bytes, rows in [(1, 1), (2 * row, 2)]:
        y, (gx,), seen = run(chunk_bytes)
        assert seen == ([rows] * (5 // rows) + [5 % rows] * (5 % rows > 0) if chunked else [5])
        assert _rel(y, whole) < 1e-13  # a chunk may scale its output instead of the weight: rounding
        assert _rel(gx, run(2 ** 30)[1][0]) < 1e-13
    y, (gx, gw), seen = run(1, weight_grad=True)  # training-style weight gradient: the forward still chunks
    ref = run(2 ** 30, weight_grad=True)[1]
    assert _rel(gx, ref[0]) < 1e-13 and _rel(gw, ref[1]) < 1e-13


@pytest.mark.parametrize('max_out', [1, 2, 3])
def test_inference_path_equals_training_path(max_out):
    """Without gradients the transform skips the autograd node and the MaxOut winners: same outputs."""
    for layer, x in [(BcosConv2d(6, 8, 3, padding=1, max_out=max_out), torch.randn(2, 6, 9, 9)),
                     (BcosLinear(6, 5, max_out=max_out), torch.randn(3, 6))]:
        with torch.no_grad():
            fast = layer(x)
        trained = layer(x)
        assert torch.equal(fast, trained) and fast.grad_fn is None and trained.grad_fn is not None


@pytest.mark.parametrize('max_out', [1, 2, 3])
def test_traced_form_keeps_the_output_shape(max_out):
    """The compiler's form of the transform (`_bcos_traceable`) works on the convolution output's own
    (N, C, H, W) shape for ungrouped layers: no 6-D unit view, whose layout Inductor chose
    channels-first next to channels-last convolutions, transposing between them in every kernel
    (compiled resnet50 MaxOut 1 training: 1.19x timm's with the view, 1.04x without)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from timm_bcos.layers.bcos_function import _bcos_traceable
    layer = BcosConv2d(6, 8, 3, padding=1, max_out=max_out)
    x = torch.randn(2, 6, 9, 9).contiguous(memory_format=torch.channels_last)
    w = layer.weight.detach()
    for detach in (False, True):
        def transform(x, w):
            x, w = x.requires_grad_(), w.requires_grad_()
            y = _bcos_traceable(x, w, layer._geometry, max_out, layer.b, layer.scale, detach, x.dtype)
            return (y, *torch.autograd.grad(y.square().sum(), (x, w)))

        graph = make_fx(transform)(x, w)
        values = [n.meta['val'] for n in graph.graph.nodes if isinstance(n.meta.get('val'), torch.Tensor)]
        # activations; per-patch (N, 1, H, W) tensors are C times smaller
        large = [v for v in values if v.dim() > 0 and v.shape[0] == len(x) and v.numel() >= x.numel()]
        assert len(large) > 10 and all(v.dim() == 4 for v in large)
        y = transform(x.clone(), w.clone())[0]
        assert y.is_contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert _rel(y, layer(x)) < 1e-6


@pytest.mark.parametrize('max_out,groups', [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_channels_last_in_channels_last_out(max_out, groups, bcos_path):
    """A channels-last model (timm's ``--channels-last``) stays channels-last through B-cos layers,
    forward and backward, with the same values as channels-first."""
    layer = BcosConv2d(6, 8, 3, padding=1, groups=groups, max_out=max_out).double()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, layer.weight), grad)
    layer.to(memory_format=torch.channels_last)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y_cl = layer(x_cl)
    gx_cl, gw_cl = torch.autograd.grad(y_cl, (x_cl, layer.weight), grad.contiguous(memory_format=torch.channels_last))
    if not (bcos_path == 'traceable' and groups > 1 and max_out > 1):  # there a 6-D view: the compiler's choice
        assert y_cl.is_contiguous(memory_format=torch.channels_last)
        assert gx_cl.is_contiguous(memory_format=torch.channels_last)
    assert _rel(y_cl, y) < 1e-12 and _rel(gx_cl, gx) < 1e-12 and _rel(gw_cl, gw) < 1e-12


@pytest.mark.parametrize('cin,kwargs', [
    (3, dict(kernel_size=7, stride=2, padding=3)), (6, dict(kernel_size=3, padding=1)),
    (6, dict(kernel_size=4, stride=4)), (8, dict(kernel_size=1)), (9, dict(kernel_size=3, padding=1))])
def test_few_input_channels_take_the_input_gradient_from_gemm(cin, kwargs, monkeypatch):
    """On CPU the input gradient of a layer with at most 8 input channels (the 6-channel first layer,
    whose input gradient `explain` returns) comes from ATen's GEMM + col2im backward, not oneDNN's;
    both give the same gradients, alone and together with the weight gradient. In float32: oneDNN
    has no float64 kernels (PyTorch's float64 convolutions take the GEMM path anyway)."""
    from timm_bcos.layers import bcos_geometry
    layer = BcosConv2d(cin, 8, max_out=2, **kwargs)
    x = torch.randn(2, cin, 17, 15, requires_grad=True)

    def grads(threshold, inputs):
        monkeypatch.setattr(bcos_geometry, 'SMALL_INPUT_CHANNELS', threshold)
        y = layer(x)
        with torch.profiler.profile() as prof:
            g = torch.autograd.grad(y, inputs, torch.ones_like(y))
        return g, any(e.name == 'aten::_slow_conv2d_backward' for e in prof.events())

    for inputs in [(x,), (x, layer.weight)]:
        (ours, used), (onednn, unused) = grads(8, inputs), grads(0, inputs)
        assert used == (cin <= 8) and not unused
        assert all(_rel(a, b) < 1e-5 for a, b in zip(ours, onednn))


def test_linear_gradcheck(bcos_path):
    for b, m in [(1.0, 1), (1.75, 2), (2.0, 2), (3.0, 3)]:
        layer = BcosLinear(6, 5, b=b, max_out=m).double()
        x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (x,))


# --- dynamic linearity (Eq. 10-14) -----------------------------------------------------------

def _saved_for_backward(layer: nn.Module, x: torch.Tensor):
    """Shapes and bytes of the non-parameter storages autograd keeps for `layer(x)`'s backward."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return list(saved.values())


@pytest.mark.parametrize('max_out', [1, 2])
def test_backward_keeps_one_activation_beyond_the_conv_input(max_out):
    """The fused layer keeps its input, the selected units (and MaxOut's winners), the per-patch
    norm and each unit's 1 / ||w|| for backward: at most one linear-output-sized tensor more than
    the convolution it wraps, and no weight-sized one (the unit-norm weight is recomputed in backward)."""
    torch.manual_seed(0)
    layer = BcosConv2d(16, 32, 3, padding=1, max_out=max_out)
    x = AddInverse()(torch.rand(4, 8, 16, 16)).requires_grad_(True)
    saved = _saved_for_backward(layer, x)
    assert all(shape != tuple(layer.weight.shape) for shape, _ in saved)
    conv_saved = sum(n for _, n in _saved_for_backward(nn.Conv2d(16, 32 * max_out, 3, padding=1, bias=False), x))
    lin_output = 4 * 32 * max_out * 16 * 16 * 4
    norm, inv_norm = 4 * 16 * 16 * 4, 32 * max_out * 4  # per patch; 1 / ||w|| per unit
    assert conv_saved == x.numel() * 4 and sum(n for _, n in saved) <= conv_saved + lin_output + norm + inv_norm


def _stack(dtype, **conv_kwargs):
    """conv -> conv -> pool -> linear -> logit layer, as in a small B-cos classifier."""
    net = nn.Sequential(
        BcosConv2d(6, 8, 3, padding=1, **conv_kwargs),
        BcosConv2d(8, 16, 3, stride=2, padding=1, **conv_kwargs),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        BcosLinear(16, 10),
        LogitLayer(bias=math.log(0.1 / 0.9), temperature=0.1),
    )
    return net.to(dtype)


@pytest.mark.parametrize('conv_kwargs', [
    {},
    dict(dilation=2, padding_mode='reflect'),
    dict(padding_mode='circular', b=2.5),
    dict(b=1.25, max_out=1),
], ids=['plain', 'dilation-reflect', 'circular-b2.5', 'b1.25-m1'])
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_dynamic_linearity(conv_kwargs, dtype, tol):
    net = _stack(dtype, **conv_kwargs)
    bias = math.log(0.1 / 0.9)
    x = AddInverse()(torch.rand(4, 3, 12, 12, dtype=dtype))
    x.requires_grad_(True)
    with explanation_mode(net):
        out = net(x)
        rows = []
        for c in range(out.shape[1]):
            (w,) = torch.autograd.grad(out[:, c].sum(), x, retain_graph=True)
            rows.append(w)
    weights = torch.stack(rows, 1)  # (N, classes, 6, H, W): W(x)
    linear = (weights * x.detach().unsqueeze(1)).flatten(2).sum(2) + bias
    assert ((linear - out).abs().max() / (out - bias).abs().max()).item() < tol
    # Out of explanation mode the forward is the same function: f(x) = W(x) x + b.
    with torch.no_grad():
        out_normal = net(x)
    assert ((linear - out_normal).abs().max() / (out_normal - bias).abs().max()).item() < tol
    # The public check agrees.
    assert timm_bcos.check_dynamic_linearity(net, x) < tol


def test_linearity_check_refuses_unresolvable_outputs():
    model = timm_bcos.BcosSimpleNet()
    # An untrained full-width paper net: f(x) - b is ~1e-6 next to b = log(1/9), yet the check
    # resolves it in float32 because it takes the logit bias out.
    x = AddInverse()(torch.rand(2, 3, 32, 32))
    assert timm_bcos.check_dynamic_linearity(model, x) < 1e-4
    assert [m.bias for m in model.modules() if isinstance(m, LogitLayer)] == [math.log(0.1 / 0.9)]
    # Outputs equal to the bias (a zero input) cannot be checked: NaN and a warning, never 0.
    with pytest.warns(UserWarning, match='float64'):
        assert math.isnan(timm_bcos.check_dynamic_linearity(model, torch.zeros(2, 6, 32, 32)))


def test_explanation_mode_nests_and_restores():
    net = _stack(torch.float32)
    layers = [m for m in net.modules() if isinstance(m, timm_bcos.DetachableModule)]
    assert not timm_bcos.is_explanation_mode(net)
    with explanation_mode(net):
        assert all(m.detach_dynamic for m in layers)
        with explanation_mode(net, active=False):
            assert not any(m.detach_dynamic for m in layers)
        assert all(m.detach_dynamic for m in layers)
    assert not timm_bcos.is_explanation_mode(net)
    with pytest.raises(RuntimeError):
        with explanation_mode(net):
            raise RuntimeError('boom')
    assert not timm_bcos.is_explanation_mode(net)


def test_explanation_mode_gives_the_linear_map_not_the_gradient():
    layer = BcosConv2d(6, 4, 3, padding=1).double()
    x = torch.rand(1, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    (g_normal,) = torch.autograd.grad(layer(x).sum(), x)
    with explanation_mode(layer):
        (g_explain,) = torch.autograd.grad(layer(x).sum(), x)
    # For B=2, d(W(x)x)/dx = 2 W(x) - (norm term) != W(x): the modes must differ.
    assert _rel(g_normal, g_explain) > 0.1
    assert (g_explain * x).sum().item() == pytest.approx(layer(x).sum().item(), rel=1e-12)


# --- the bound of Eq. 4 ----------------------------------------------------------------------

@pytest.mark.parametrize('b', [1.0, 1.5, 2.0, 5.0])
def test_bound_eq4(b):
    unit = BcosLinear(16, 1, b=b, max_out=1, scale=None).double()
    x = torch.randn(1000, 16, dtype=torch.float64) * torch.rand(1000, 1, dtype=torch.float64) * 10
    out = unit(x).squeeze(1)
    assert (out.abs() <= x.norm(dim=1) * (1 + 1e-12)).all()
    # equality when x is aligned with w (up to the 1e-6 stabiliser inside the norm)
    w = unit.weight.detach()[0]
    aligned = torch.stack([w / w.norm() * s for s in (1.0, 3.0, 20.0)])
    assert torch.allclose(unit(aligned).squeeze(1), aligned.norm(dim=1), rtol=1e-5)
    # anti-aligned: -||x||
    assert torch.allclose(unit(-aligned).squeeze(1), -aligned.norm(dim=1), rtol=1e-5)


def test_bound_eq4_conv_patch():
    layer = BcosConv2d(3, 1, 3, b=2.0, max_out=1, scale=None).double()
    x = torch.randn(200, 3, 3, 3, dtype=torch.float64)
    out = layer(x).flatten()
    assert (out.abs() <= x.flatten(1).norm(dim=1) * (1 + 1e-12)).all()
    aligned = layer.weight.detach() / layer.weight.detach().norm() * 4.0
    assert layer(aligned).item() == pytest.approx(aligned.norm().item(), rel=1e-6)


# --- alignment pressure (Fig. 2) -------------------------------------------------------------

def _fig2_angle(b: float, other_angle: float) -> float:
    """Train one B-cos unit with BCE on a fixed red cluster at 45 degrees vs another class."""
    def cluster(angle, n=16, spread=10.0):
        a = torch.deg2rad(torch.linspace(-spread, spread, n, dtype=torch.float64) + angle)
        r = torch.linspace(2.0, 1.0, n, dtype=torch.float64)
        return torch.stack([r * torch.cos(a), r * torch.sin(a)], 1)

    x = torch.cat([cluster(45.0), cluster(other_angle)])
    y = torch.cat([torch.ones(16), torch.zeros(16)]).double()
    unit = BcosLinear(2, 1, b=b, max_out=1, scale=None).double()
    with torch.no_grad():
        unit.weight.copy_(torch.tensor([[1.0, 0.0]]))
    opt = torch.optim.Adam(unit.parameters(), lr=0.05)
    for _ in range(200):  # logit = 4 * B-cos(x; w) - 3: a fixed temperature and bias
        loss = F.binary_cross_entropy_with_logits(4 * unit(x).squeeze(1) - 3, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = unit.weight.detach()[0]
    return math.degrees(math.atan2(w[1].item(), w[0].item()))


def test_alignment_pressure_fig2():
    # Same red cluster, the other class at -20 or at 110 degrees.
    linear = _fig2_angle(1.0, -20.0), _fig2_angle(1.0, 110.0)
    bcos5 = _fig2_angle(5.0, -20.0), _fig2_angle(5.0, 110.0)
    # B=1: the weight is a discriminative direction that depends on the other class.
    assert abs(linear[0] - linear[1]) > 30
    # B=5: both weights align with the red cluster, whatever the other class.
    assert abs(bcos5[0] - bcos5[1]) < 10
    assert all(abs(a - 45.0) < 10 for a in bcos5)


# --- trainability: the output scale of norm-free networks ------------------------------------

def _train_digits(scale, steps=150):
    model = timm_bcos.models.BcosSimpleNet(widths=(16, 16, 32, 32, 32, 64, 64, 64), scale=scale)
    return fit_digits(model, size=16, steps=steps, batch=64)


def test_default_scale_trains_norm_free_net():
    losses, acc = _train_digits('auto')
    assert sum(losses[-20:]) / 20 < 0.3 * losses[0]
    assert acc > 0.8


def test_norm_free_net_without_scale_does_not_train():
    # Why the default matters: without v1's output scale, activations vanish layer by layer and
    # the BCE stays at its floor for the logit bias (the paper-design net cannot learn).
    losses, acc = _train_digits(None, steps=60)
    assert min(losses) > 0.95 * losses[0]
    assert acc < 0.3


# --- numerics: autocast, zero input ----------------------------------------------------------

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('b', [1.0, 1.5, 2.0, 2.5])
def test_autocast_single_layer_finite(dtype, b, bcos_path):
    """Every B-cos layer input with patch norms from 0 to 1e3, and an all-zero unit: finite outputs
    and gradients, on both paths."""
    layers = [BcosConv2d(6, 8, 3, padding=1, b=b), BcosConv2d(8, 8, 3, padding=1, groups=8, b=b, scale=None),
              BcosLinear(54, 8, b=b)]
    for layer in layers:
        with torch.no_grad():
            layer.weight[0].zero_()
        shape = (4, layer.in_channels, 8, 8) if isinstance(layer, BcosConv2d) else (4, 54)
        patch = 9 * layer.in_channels // layer.groups if isinstance(layer, BcosConv2d) else 54
        for norm in (0.0, 1e-3, 1.0, 1e3):
            x = (torch.rand(shape) * (norm / math.sqrt(patch))).requires_grad_(True)
            with torch.autocast('cpu', dtype=dtype):
                out = layer(x)
            assert out.dtype == dtype and torch.isfinite(out).all(), (layer, norm)
            out.float().sum().backward()
            assert torch.isfinite(x.grad).all(), (layer, norm)
            # The eager Function sums fp16 weight gradients in float32; the traced path leaves them to
            # the compiled conv's fp16 backward, which overflows past 65504 (here at patch norm 1e3),
            # as timm's own convs do: GradScaler's job.
            if not (bcos_path == 'traceable' and dtype == torch.float16 and norm > 1):
                assert torch.isfinite(layer.weight.grad).all(), (layer, norm)
            layer.zero_grad()


@pytest.mark.parametrize('scales_output', [False, True])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_zero_unit_is_finite_under_autocast(dtype, scales_output, bcos_path, monkeypatch):
    """Outputs scaled by 1/||w|| (the traced path always, the fused one for small outputs): a zero
    unit's 1/||w|| must not overflow fp16."""
    from timm_bcos.layers import bcos_function
    monkeypatch.setattr(bcos_function, '_scales_output', lambda *args: scales_output)
    layer = BcosConv2d(4, 8, 3, padding=1, max_out=2)
    with torch.no_grad():
        layer.weight[0].zero_()
    with torch.autocast('cpu', dtype=dtype):
        assert torch.isfinite(layer(torch.rand(2, 4, 8, 8))).all()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_network_finite(dtype):
    net = _stack(torch.float32)
    for norm in (1e-3, 1.0, 1e3):  # per-sample input norms
        x = torch.rand(2, 6, 12, 12)
        x = (x / x.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * norm).requires_grad_(True)
        with torch.autocast('cpu', dtype=dtype):
            out = net(x)
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
        net.zero_grad()


@pytest.mark.parametrize('b', [1.0, 1.25, 2.0, 2.5])
def test_zero_input(b):
    for layer, x in [(BcosConv2d(6, 4, 3, padding=1, b=b), torch.zeros(2, 6, 5, 5)),
                     (BcosLinear(6, 4, b=b), torch.zeros(3, 6))]:
        x.requires_grad_(True)
        out = layer(x)
        assert torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize('case', CONV_CASES, ids=[str(c) for c in CONV_CASES])
@pytest.mark.parametrize('max_out', [1, 3])
def test_skipping_zero_inputs_gives_the_computed_output(case, max_out, monkeypatch):
    """`skipping_zero_inputs` (explain's bias forward): an all-zero input gives, uncomputed, exactly the
    computed output (shape, dtype, layout), also channels-last and under autocast; any other input
    is computed."""
    from timm_bcos.layers import bcos_function, skipping_zero_inputs
    conv = BcosConv2d(4, 8, max_out=max_out, **case)
    computed = []
    forward = bcos_function._bcos_forward
    monkeypatch.setattr(bcos_function, '_bcos_forward', lambda *a, **k: (computed.append(1), forward(*a, **k))[1])
    cases = [(conv, torch.zeros(2, 4, 9, 10)), (conv, torch.zeros(2, 4, 9, 10).to(memory_format=torch.channels_last)),
             (BcosLinear(6, 5, max_out=max_out), torch.zeros(2, 3, 6))]
    for layer, x in cases:
        for autocast in (False, True):
            with torch.no_grad(), torch.autocast('cpu', torch.bfloat16, enabled=autocast):
                expected = layer(x)
                computed.clear()
                with skipping_zero_inputs():
                    got = layer(x)
                    assert not computed
                    layer(x + 1e-30)  # not all zero
                    assert computed
            assert torch.equal(got, expected) and got.dtype == expected.dtype and got.stride() == expected.stride()


# --- errors and argument checks ---------------------------------------------------------------

def test_three_channel_input_error_names_the_encoding():
    layer = BcosConv2d(6, 4, 3)
    with pytest.raises(ValueError, match=r'6 input channels, got 3.*AddInverse'):
        layer(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match='4-D input'):
        layer(torch.rand(6, 8, 8))
    with pytest.raises(TypeError, match='floating point'):
        layer(torch.zeros(1, 6, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match='expects 10 input channels'):
        BcosLinear(10, 2)(torch.rand(2, 9))


def test_bad_arguments():
    with pytest.raises(ValueError, match='B must be'):
        BcosConv2d(6, 4, 3, b=0.5)
    with pytest.raises(ValueError, match='max_out'):
        BcosLinear(6, 4, max_out=0)
    with pytest.raises(ValueError, match='divisible by groups'):
        BcosConv2d(6, 4, 3, groups=4)
    with pytest.raises(ValueError, match='padding_mode'):
        BcosConv2d(6, 4, 3, padding_mode='mirror')
    with pytest.raises(ValueError, match='scale'):
        BcosConv2d(6, 4, 3, scale=-1.0)
    with pytest.raises(ValueError, match='strided'):
        BcosConv2d(6, 4, 3, stride=2, padding='same')


def test_add_inverse():
    x = torch.rand(2, 3, 4, 4)
    enc = AddInverse()(x)
    assert enc.shape == (2, 6, 4, 4)
    assert torch.equal(enc[:, 3:], 1 - x)
    with pytest.raises(ValueError, match=r'\[0, 1\].*values in \[-2'):
        AddInverse()(torch.full((1, 3, 2, 2), -2.1))
    with pytest.raises(ValueError, match='NaN or inf'):
        AddInverse()(torch.tensor([[[[0.5, float('nan')]]]]))
    with pytest.raises(ValueError, match='NaN or inf'):
        AddInverse()(torch.tensor([[[[0.5, float('inf')]]]]))
    AddInverse()(torch.tensor([[[[1.0005, -0.0005]]]]))  # within tolerance


def test_logit_layer():
    layer = LogitLayer(bias=-2.0, temperature=0.5)
    assert torch.equal(layer(torch.tensor([1.0, 2.0])), torch.tensor([0.0, 2.0]))
    assert torch.equal(LogitLayer()(torch.tensor([3.0])), torch.tensor([3.0]))
    with pytest.raises(ValueError):
        LogitLayer(temperature=0.0)


def test_state_dict_and_repr():
    layer = BcosConv2d(6, 4, 3, padding=1, groups=2)
    assert list(layer.state_dict()) == ['weight']
    assert layer.weight.shape == (8, 3, 3, 3)
    assert layer.bias is None
    assert 'max_out=2' in repr(layer) and 'b=2' in repr(layer)
    assert BcosLinear(6, 4, max_out=1).weight.shape == (4, 6)
