"""`explain`: exact W(x) rows (Eq. 13-15) for batches, targets and neurons; visualisation; errors."""
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from timm_bcos import AddInverse, BcosConv2d, BcosLinear, BcosSimpleNet, LogitLayer, explanation_mode
from timm_bcos.explain import Explanation, explain

N, HW = 3, 12


def _net(dtype=torch.float64, classes=10):
    return BcosSimpleNet(classes, widths=(8, 8, 16, 16), strides=(1, 2, 1, 2)).to(dtype)


def _images(dtype=torch.float64, n=N):
    return torch.rand(n, 3, HW, HW, dtype=dtype)


def _mixed_net():
    """Convolutions, then a B-cos linear head on pooled features: (N, C) activations inside."""
    return nn.Sequential(
        BcosConv2d(6, 8, 3, padding=1), BcosConv2d(8, 8, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), BcosLinear(8, 12), BcosLinear(12, 7),
        LogitLayer(bias=-math.log(6)),
    ).double()


def _input_gradient(model, x, fn):
    """d fn(model(x)) / dx in explanation mode, per image (independent of `explain`)."""
    rows = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        with explanation_mode(model):
            (g,) = torch.autograd.grad(fn(model(xi), i), xi)
        rows.append(g[0])
    return torch.stack(rows)


def _eq13_error(e):
    return ((e.contributions.sum((-2, -1)) + e.bias - e.logits).abs().max()
            / (e.logits - e.bias).abs().max()).item()


# --- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize('make', [_net, _mixed_net], ids=['simple_net', 'conv+linear'])
def test_weights_are_the_input_gradient_in_explanation_mode(make):
    model = make().eval()
    x = AddInverse()(_images())
    e = explain(model, x, k=3)
    assert e.weights.shape == (N, 3, 6, HW, HW)
    for j in range(3):
        expected = _input_gradient(model, x, lambda out, i: out[0, e.targets[i, j]])
        torch.testing.assert_close(e.weights[:, j], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(e.contributions, (e.weights * x[:, None]).sum(2))
    torch.testing.assert_close(e.inputs, x)


def _target_cases(out):
    n, c = out.shape
    per_image = [1, 7, 3]
    table = torch.tensor([[0, 9], [4, 4], [2, 5]])
    return {
        'default': (dict(), out.argmax(1, keepdim=True)),
        'int': (dict(target=4), torch.full((n, 1), 4)),
        'per_image_list': (dict(target=per_image), torch.tensor(per_image)[:, None]),
        'tensor_NT': (dict(target=table), table),
        'top5': (dict(k=5), out.topk(5, 1).indices),
    }


@pytest.mark.parametrize('case', ['default', 'int', 'per_image_list', 'tensor_NT', 'top5'])
def test_contributions_plus_bias_equal_logits_float64(case):
    model = _net().eval()
    x = _images()
    with torch.no_grad():
        out = model(AddInverse()(x))
        bias = model(torch.zeros(1, 6, HW, HW, dtype=torch.float64))[0]
    kwargs, targets = _target_cases(out)[case]
    e = explain(model, x, **kwargs, verify=True)
    assert torch.equal(e.targets, targets)
    rows = torch.arange(N)[:, None]
    torch.testing.assert_close(e.logits, out[rows, targets], rtol=0, atol=0)
    torch.testing.assert_close(e.bias, bias[targets].expand_as(e.logits))
    torch.testing.assert_close(e.probabilities, torch.sigmoid(e.logits))
    assert torch.equal(e.prediction, out.argmax(1))
    assert e.check() < 1e-10
    assert _eq13_error(e) < 1e-10
    if case == 'top5':  # ordered by logit
        assert (e.logits[:, :-1] >= e.logits[:, 1:]).all()


def test_contributions_plus_bias_equal_logits_float32():
    model = _net(torch.float32)
    e = explain(model, _images(torch.float32, n=4), k=3, verify=True)
    assert e.weights.dtype == torch.float32
    assert e.check() < 1e-4


def test_bias_forward_skips_zero_inputs_only(monkeypatch):
    """b = f(0) (Eq. 13) from a forward in which B-cos layers skip all-zero inputs: bit-identical to
    computing them, and every layer after a bias still computes (linear there, B = 1 and MaxOut 1:
    with a bias inside, only those keep f dynamic-linear with b = f(0))."""
    from timm_bcos.layers import bcos_function
    model = nn.Sequential(
        BcosConv2d(6, 8, 3, padding=1), BcosConv2d(8, 8, 3, padding=1, b=1, max_out=1, bias=True),
        BcosConv2d(8, 8, 3, stride=2, padding=1, b=1, max_out=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        BcosLinear(8, 7, b=1, max_out=1),
        LogitLayer(bias=-math.log(6)),
    ).double().eval()
    nn.init.normal_(model[1].bias)
    x = _images()
    with torch.no_grad():
        expected = model(torch.zeros(1, 6, HW, HW, dtype=torch.float64))[0]
    computed = []
    forward = bcos_function._bcos_forward
    monkeypatch.setattr(bcos_function, '_bcos_forward', lambda x, *args, **kwargs: (
        computed.append(len(x)), forward(x, *args, **kwargs))[1])
    e = explain(model, x, k=3, verify=True)
    assert computed == [N, N, N, N, 1, 1]  # the batch, then f(0): the layers after the bias only
    assert torch.equal(e.bias, expected[e.targets])
    assert (expected != -math.log(6)).all()  # the bias reaches the logits through the later layers


def test_layers_run_in_chunks_of_images_give_the_same_explanation(monkeypatch):
    """Explanation-mode layers run over the batch in chunks of images (`CHUNK_BYTES`; here one image):
    the same rows of W(x), also for several targets (backward passes through a retained graph)."""
    from timm_bcos.layers import bcos_function
    model, x = _net().eval(), _images()
    whole = explain(model, x, k=3, verify=True)
    monkeypatch.setattr(bcos_function, 'CHUNK_BYTES', 1)
    chunked = explain(model, x, k=3, verify=True)
    torch.testing.assert_close(chunked.weights, whole.weights, rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-12, atol=0)


def test_intermediate_neuron_equals_its_activation():
    model = _net().eval()
    x = AddInverse()(_images())
    seen = []
    handle = model.features[2].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    act = seen[0]  # (N, 16, 6, 6)
    e = explain(model, x, layer='features.2', neuron=[5, 11], verify=True)
    assert e.prediction is None and e.probabilities is None and e.layer == 'features.2'
    for j, c in enumerate((5, 11)):
        flat = act[:, c].flatten(1)
        best = flat.argmax(1)
        assert torch.equal(e.positions[:, j], torch.stack([best // 6, best % 6], 1))
        torch.testing.assert_close(e.logits[:, j], flat.max(1).values, rtol=0, atol=0)
        # B-cos layers have no bias: the activation is exactly the sum of the contributions.
        torch.testing.assert_close(e.contributions[:, j].sum((-2, -1)) + e.bias[:, j], e.logits[:, j],
                                   rtol=1e-10, atol=1e-12)
        expected = _input_gradient(model.features[:3], x, lambda out, i: out[0, c].flatten()[best[i]])
        torch.testing.assert_close(e.weights[:, j], expected, rtol=1e-12, atol=1e-14)
    # A fixed position.
    e = explain(model, x, layer='features.2', neuron=5, position=(1, 4))
    torch.testing.assert_close(e.logits[:, 0], act[:, 5, 1, 4], rtol=0, atol=0)
    assert e.check() < 1e-10


def test_linear_layer_neuron_has_no_position():
    model = _mixed_net().eval()
    x = AddInverse()(_images())
    e = explain(model, x, layer='4', neuron=torch.tensor([[0], [3], [11]]), verify=True)
    assert e.positions is None
    with torch.no_grad():
        act = model[:5](x)
    torch.testing.assert_close(e.logits[:, 0], act[torch.arange(N), torch.tensor([0, 3, 11])], rtol=0, atol=0)
    assert e.check() < 1e-10


def test_three_channel_input_is_encoded():
    model = _net()
    x = _images()
    e3, e6 = explain(model, x, k=2), explain(model, AddInverse()(x), k=2)
    for name in ('weights', 'contributions', 'logits', 'targets', 'bias', 'inputs'):
        assert torch.equal(getattr(e3, name), getattr(e6, name)), name


def test_input_dtype_follows_the_model_and_inference_mode_is_left():
    model = _net()
    with torch.inference_mode():
        x = _images(torch.float32)
        e = explain(model, x)
    assert e.weights.dtype == torch.float64 and not e.weights.requires_grad
    assert e.check() < 1e-10


# --- visualisation -----------------------------------------------------------------------------

def test_to_rgba_masks_negative_contributions():
    model = _net()
    e = explain(model, _images(), k=2)
    for smooth in (1, 5):
        rgba = e.to_rgba(index=1, target=1, smooth=smooth)
        assert rgba.shape == (HW, HW, 4)
        assert rgba.min() >= 0 and rgba.max() <= 1
        hidden = (e.contributions[1, 1] <= 0).numpy()
        assert hidden.any() and (~hidden).any()
        assert (rgba[..., 3][hidden] == 0).all()
        assert (rgba[..., 3][~hidden] > 0).all()


def test_to_rgba_colour_and_opacity_formula():
    # One row: a pixel weighting r strongly, one weighting 1-g, one with a negative contribution.
    w = torch.zeros(1, 1, 6, 1, 3, dtype=torch.float64)
    w[..., 0] = torch.tensor([3.0, 1.0, 0.0, 1.0, 1.0, 0.0])[:, None]
    w[..., 1] = torch.tensor([0.0, 0.0, -1.0, 0.0, 2.0, 0.0])[:, None]
    w[..., 2] = torch.tensor([-4.0, 0.0, 0.0, 0.0, 0.0, 0.0])[:, None]
    x = torch.full((1, 6, 1, 3), 0.5, dtype=torch.float64)
    contributions = (w * x[:, None]).sum(2)
    e = Explanation(weights=w, contributions=contributions, logits=contributions.sum((-2, -1)),
                    targets=torch.zeros(1, 1, dtype=torch.long), bias=torch.zeros(1, 1), inputs=x)
    rgba = e.to_rgba(percentile=100)
    np.testing.assert_allclose(rgba[0, 0], [0.75, 0.5, 0, math.sqrt(12) / 4], atol=1e-6)
    np.testing.assert_allclose(rgba[0, 1], [0, 0, 0, math.sqrt(5) / 4], atol=1e-6)
    np.testing.assert_array_equal(rgba[0, 2], [0, 0, 0, 0])  # r clamped away; contribution < 0
    assert e.check() < 1e-15
    e.logits[0, 0] = math.nan
    assert e.check() == math.inf


def test_delta_is_the_difference_of_contribution_maps():
    e = explain(_net(), _images(), target=torch.tensor([[3, 7]] * N))
    torch.testing.assert_close(e.delta(0, 1, index=2), e.contributions[2, 0] - e.contributions[2, 1])
    assert e.column(7, index=2) == 1
    with pytest.raises(ValueError, match=r'5 was not explained for image 0; explained targets: \[3, 7\]'):
        e.column(5)
    with pytest.raises(IndexError, match='2 targets were explained'):
        e.delta(0, 2)


def test_save_writes_a_png_and_plot_draws_every_target(tmp_path):
    matplotlib_image = pytest.importorskip('matplotlib.image')
    model = _net(classes=4)
    model.pretrained_cfg = {'label_names': ['cat', 'dog', 'eel', 'fox']}
    e = explain(model, _images(n=2), k=2)
    assert e.class_names == ['cat', 'dog', 'eel', 'fox']
    fig = e.plot(index=1)
    titles = [ax.get_title() for ax in fig.axes]
    assert sum(t.startswith(('cat', 'dog', 'eel', 'fox')) and ': p=' in t for t in titles) == 2
    path = tmp_path / 'explanation.png'
    e.save(path, class_names=['a', 'b', 'c', 'd'])
    image = matplotlib_image.imread(path)
    assert image.ndim == 3 and image.shape[0] > image.shape[1]  # 4 rows of 3 panels
    assert os.listdir(tmp_path) == ['explanation.png']  # no temporary file left behind


# --- errors and state --------------------------------------------------------------------------

@pytest.mark.parametrize('x,kwargs,error,match', [
    (torch.rand(2, 4, 8, 8), {}, ValueError, r'expects input of shape \(N, 6, H, W\) or \(N, 3, H, W\)'),
    (torch.full((2, 6, 8, 8), math.nan), {}, ValueError, 'NaN or inf'),
    (torch.rand(6, 8, 8), {}, ValueError, r'x.unsqueeze\(0\)'),
    (torch.cat([torch.rand(2, 3, 8, 8), 1 - torch.rand(2, 3, 8, 8)], 1) * 255, {}, ValueError,
     r'6-channel encoding \[x, 1-x\] of images x in \[0, 1\].*values in \[\d[\d.]*, 2\d\d[\d.]*\]'),  # 0-255 range
    (torch.rand(2, 6, 8, 8), {}, ValueError, r'channels 3-5 differ from 1 - channels 0-2 by up to 0\.'),
    (torch.randint(0, 2, (2, 3, 8, 8)), {}, TypeError, 'floating point'),
    (torch.rand(2, 3, 8, 8) * 3, {}, ValueError, r'values in \[0, 1\]'),
    (torch.rand(2, 3, 8, 8), dict(target=10), ValueError, r'target classes must be in \[0, 10\), got \[10\]'),
    (torch.rand(2, 3, 8, 8), dict(target=[1, 2, 3]), ValueError, 'expected 2 entries, got 3'),
    (torch.rand(2, 3, 8, 8), dict(target=1.5), TypeError, 'integers'),
    (torch.rand(2, 3, 8, 8), dict(k=11), ValueError, r'k must be an int in \[1, 10\]'),
    (torch.rand(2, 3, 8, 8), dict(layer='features.9', neuron=0), ValueError,
     r"unknown layer 'features.9'; close matches: \[.*'features.0'"),
    (torch.rand(2, 3, 8, 8), dict(layer='features.1', neuron=8), ValueError, r'in \[0, 8\)'),
    (torch.rand(2, 3, 8, 8), dict(layer='features.1', neuron=0, position=(9, 0)), ValueError, 'position'),
    (torch.rand(2, 3, 8, 8), dict(neuron=0), ValueError, 'layer='),
])
def test_bad_inputs_raise_clear_errors(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        explain(_net(torch.float32), x, **kwargs)


@pytest.mark.parametrize('violation', [1e-3, 1e-6])
def test_verify_rejects_a_model_that_is_not_dynamic_linear(violation):
    class Bend(nn.Module):  # y = x + v x^2 / max|x|: Eq. 13 is off by about v of |f(x) - b|
        def forward(self, x):
            return x + violation * x * x / x.detach().abs().max().clamp_min(1e-12)

    model = nn.Sequential(BcosConv2d(6, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), Bend()).double()
    if violation > 1e-4:
        with pytest.raises(RuntimeError, match='Eq. 13 violated'):
            explain(model, _images(), verify=True)
    else:
        assert 0 < explain(model, _images(), verify=True).check() < 1e-4


def test_parameters_and_modes_are_restored_also_after_an_error():
    model = _net(torch.float32)
    model.train()
    model.features[1].eval()
    model.features[0].weight.requires_grad_(False)
    inside = []
    model.features[2].register_forward_hook(
        lambda m, i, o: inside.append((m.weight.requires_grad, m.training, m.detach_dynamic)))

    def state():
        return ([p.requires_grad for p in model.parameters()], [m.training for m in model.modules()],
                [getattr(m, 'detach_dynamic', None) for m in model.modules()])

    before = state()
    explain(model, _images(torch.float32), k=2)
    assert inside == [(False, False, True)] * 2  # frozen, eval, explanation mode; the batch and f(0)
    assert state() == before
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError):
        explain(model, _images(torch.float32), target=99)
    assert state() == before
