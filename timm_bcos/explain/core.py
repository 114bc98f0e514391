"""`explain`: model-inherent explanations of B-cos networks (paper §3.2.1, Eq. 13-15).

In explanation mode a B-cos network computes ``f(x) = W(x) x + b`` with ``b = f(0)`` (Eq. 13), so
one backward pass from an output gives the row ``[W_{1->l}(x)]_j`` that explains it exactly, and
``W(x) * x`` are the input contributions (Eq. 15). `explain` does this for a whole batch and any
number of targets with one forward pass and one backward pass per target column: samples are
independent, so the input gradient of ``sum_n f(x_n)[t_n]`` holds every image's row at once.
"""
from __future__ import annotations

import contextlib
import difflib
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..layers import AddInverse, BcosConv2d, contribution, explained_constants, explanation_mode, skipping_zero_inputs
from .explanation import Explanation

__all__ = ['TargetLike', 'VERIFY_TOLERANCE', 'explain']

TargetLike = Union[int, Sequence[int], Sequence[Sequence[int]], Tensor, np.ndarray]

# `explain(verify=True)` fails above this relative error of Eq. 13.
VERIFY_TOLERANCE = 1e-4


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the network is not needed for a layer's neuron."""


def explain(
        model: nn.Module,
        x: Tensor,
        target: Optional[TargetLike] = None,
        *,
        layer: Optional[str] = None,
        neuron: Optional[TargetLike] = None,
        position: Optional[Sequence[int]] = None,
        k: Optional[int] = None,
        verify: bool = False,
) -> Explanation:
    """Explain a batch exactly by the rows of the dynamic linear map W(x) (Eq. 13-15).

    One forward pass of the batch in explanation mode, then one backward pass per target column,
    each giving that column's row of W(x) for all N images. The model runs in eval mode with its
    parameters frozen (no weight gradients); both are restored afterwards. Not thread-safe for a
    model shared between threads.

    Args:
        model: a dynamic-linear model (a B-cos network) mapping the encoded input to (N, classes).
        x: (N, 6, H, W) encoded input, or (N, 3, H, W) images in [0, 1] (encoded with `AddInverse`
            when the model's first convolution takes 6 channels).
        target: classes to explain: None (the prediction), an int (for every image), N ints (one
            per image) or an (N, T) tensor (T per image).
        layer: explain a neuron of this module (a name from ``model.named_modules()``) instead of
            the outputs, with ``W_{1->l}`` of Eq. 15. Its first call in the forward is explained.
            Its output is (N, C, ...) channels first, (N, L, C) tokens (a transformer block), or
            (N, H, W, C) in a channels-last model (timm's ``output_fmt='NHWC'``, e.g. Swin).
        neuron: with `layer`: the channel(s) to explain: an int, a sequence (the same channels for
            every image) or an (N, T) tensor.
        position: with `layer`: the spatial position (one index per spatial dim; for tokens, the
            token index) of the neuron; default: where each image's channel activates most (as in
            Fig. 10).
        k: explain each image's top-k classes, ordered by logit (instead of `target`).
        verify: raise RuntimeError if Eq. 13 holds only to a relative error above 1e-4 (`check`).
    """
    if layer is None and (neuron is not None or position is not None):
        raise ValueError('neuron and position select a unit of `layer`: pass layer=... as well')
    if layer is not None and (target is not None or k is not None):
        raise ValueError('with layer=..., choose the unit with neuron=... (target and k select classes)')
    module = None if layer is None else _find_module(model, layer)
    params = [p for p in model.parameters() if p.requires_grad]
    training = [(m, m.training) for m in model.modules()]
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        with torch.inference_mode(False), torch.enable_grad(), explanation_mode(model), _retainable_graphs():
            x = _encode(model, x)
            if module is None:
                result = _explain_outputs(model, x, target, k)
            else:
                result = _explain_layer(model, module, layer, x, neuron, position)
    finally:
        for p in params:
            p.requires_grad_(True)
        for m, mode in training:
            m.training = mode
    cfg = getattr(model, 'pretrained_cfg', None)
    names = cfg.get('label_names') if isinstance(cfg, dict) else None
    result.class_names = list(names) if names is not None else None
    _check_exact(model, result, verify)
    return result


def _retainable_graphs():
    """A torch.compile'd model compiles its explanation-mode graph in here: without donated buffers,
    whose backward cannot be retained for the next target (one backward per target, `_input_rows`)."""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, 'donated_buffer'):
        return contextlib.nullcontext()
    return functorch_config.patch(donated_buffer=False)


def _check_exact(model: nn.Module, result: Explanation, verify: bool) -> None:
    """Say when the explanation is not exact: parts left unconverted (``strict=False``), or Eq. 13
    violated beyond `VERIFY_TOLERANCE` (a warning, recorded in ``result.warning``; an error with `verify`)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # NaN: unresolvable in this dtype (untrained nets), not a violation
        error = result.check()
    if verify and error > VERIFY_TOLERANCE:
        raise RuntimeError(f'Eq. 13 violated: sum(W(x) * x) + b differs from the explained outputs by '
                           f'{error:.2e} of |f(x) - b| (tolerance {VERIFY_TOLERANCE:g}); the model is '
                           f'not dynamic-linear in explanation mode or f(0) is not its bias')
    issues = []
    unconverted = (getattr(model, 'bcos_cfg', None) or {}).get('unconverted') or []
    if unconverted:
        issues.append(f'{len(unconverted)} part(s) of the model were left unconverted (strict=False), e.g. '
                      f'{unconverted[0]}')
    if error > VERIFY_TOLERANCE:
        issues.append(f'Eq. 13 holds only to a relative error of {error:.2e} (sum(W(x) * x) + b vs the outputs)')
    if issues:
        result.warning = 'not an exact explanation: ' + '; '.join(issues)
        warnings.warn(result.warning, stacklevel=3)


def _explain_outputs(model: nn.Module, x: Tensor, target, k: Optional[int]) -> Explanation:
    with explained_constants(model, len(x)) as constants:
        out = model(x)
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f'explain expects (N, classes) logits from the model, got {shape}; '
                         f'explain an intermediate output with layer=..., neuron=...')
    targets = _resolve_targets(target, k, out.detach())
    rows = torch.arange(len(x), device=x.device)
    selected = out[rows[:, None], targets]
    weights, by_constant = _input_rows(selected, x, constants)
    with _bias_forward(model):
        bias = _uncompiled(model)(torch.zeros_like(x[:1]))[0, targets]
    logits = selected.detach()
    return _assemble(weights, x, logits, targets, bias, constants=by_constant, prediction=out.detach().argmax(1),
                     probabilities=torch.sigmoid(logits))


def _explain_layer(model: nn.Module, module: nn.Module, name: str, x: Tensor, neuron, position) -> Explanation:
    with explained_constants(model, len(x)) as constants:
        act = _channels_first(_capture(model, module, name, x), model)
    n, c, spatial = act.shape[0], act.shape[1], act.shape[2:]
    neurons = _resolve_neurons(neuron, n, c, x.device)
    flat = act.reshape(n, c, -1)  # (N, C, P); P = 1 for (N, C) activations
    rows = torch.arange(n, device=x.device)[:, None]
    if position is not None:
        pos = _resolve_position(position, spatial)
        index = torch.full_like(neurons, int(np.ravel_multi_index(pos, tuple(spatial))) if spatial else 0)
    else:
        index = flat.detach()[rows, neurons].argmax(-1)  # (N, T): the maximally activating location
    selected = flat[rows, neurons, index]
    weights, by_constant = _input_rows(selected, x, constants)
    with _bias_forward(model):
        zero = _channels_first(_capture(_uncompiled(model), module, name, torch.zeros_like(x[:1])), model)
    zero = zero.reshape(1, c, -1)
    bias = zero[0, neurons, index]
    positions = None
    if spatial:
        sizes = torch.tensor(tuple(spatial), device=x.device)
        strides = torch.tensor([math.prod(spatial[d + 1:]) for d in range(len(spatial))], device=x.device)
        positions = index[..., None] // strides % sizes
    return _assemble(weights, x, selected.detach(), neurons, bias, constants=by_constant, layer=name,
                     positions=positions)


@contextlib.contextmanager
def _bias_forward(model: nn.Module):
    """The context of the forward at x = 0 that gives the bias b (Eq. 13): no gradients, explained
    constants zero, and B-cos layers skip their all-zero inputs (`skipping_zero_inputs`): only the
    layers after a bias do any work."""
    with torch.no_grad(), explained_constants(model, zero=True), skipping_zero_inputs():
        yield


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module behind ``torch.compile(model)`` (the same parameters), for the bias forward: a
    compiled graph cannot skip the zero inputs, whose test depends on the data."""
    return model._orig_mod if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model


def _channels_first(act: Tensor, model: nn.Module) -> Tensor:
    """(N, L, C) tokens as (N, C, L): a neuron is a channel at a token position; the (N, H, W, C)
    maps of a channels-last model (timm's ``output_fmt='NHWC'``: Swin) as (N, C, H, W)."""
    if act.dim() == 3:
        return act.transpose(1, 2)
    if act.dim() == 4 and getattr(model, 'output_fmt', None) == 'NHWC':
        return act.permute(0, 3, 1, 2)
    return act


def _input_rows(selected: Tensor, x: Tensor,
                constants: List[Tuple[str, Tensor]]) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:
    """Rows of W(x) for every column of `selected` (N, T): one backward per column, (N, T, *x); and
    the contribution ``W_c(x) c`` of each explained constant (by name, (N, T); None if there are none)."""
    t = selected.shape[1]
    # One target: its input gradient is the result, not copied into a new (N, 1, ...) tensor.
    weights = None if t == 1 else x.new_empty((len(x), t) + x.shape[1:])
    leaves = [c for _, c in constants]
    by_constant = {name: selected.new_zeros(selected.shape) for name, _ in constants} if constants else None
    for j in range(t):
        grads = torch.autograd.grad(selected[:, j].sum(), [x] + leaves, retain_graph=j + 1 < t, allow_unused=True)
        row = grads[0] if grads[0] is not None else torch.zeros_like(x)
        if weights is None:
            weights = row.contiguous().unsqueeze(1)
        else:
            weights[:, j] = row
        for (name, c), g in zip(constants, grads[1:]):
            if g is not None:  # a constant used after the explained layer does not contribute
                by_constant[name][:, j] += contribution(g, c.detach(), len(x))
    return weights, by_constant


def _assemble(weights: Tensor, x: Tensor, logits: Tensor, targets: Tensor, bias: Tensor, **extra) -> Explanation:
    x = x.detach()
    return Explanation(weights=weights, contributions=_contributions(weights, x), logits=logits, targets=targets,
                       bias=bias.detach().to(logits.dtype), inputs=x, **extra)


def _contributions(weights: Tensor, x: Tensor) -> Tensor:
    """``sum_c W(x) * x`` (Eq. 15, summed over the colour channels), (N, T, ...), one target at a
    time: the (N, T, C, ...) product is never made. For the top 5 of 32 images at 128 px that
    product was a fresh 63 MB, 42 ms to fault in and sum, against 7 ms (timed alone)."""
    out = weights.new_empty(weights.shape[:2] + weights.shape[3:])
    for j in range(weights.shape[1]):
        torch.linalg.vecdot(weights[:, j], x, dim=1, out=out[:, j])
    return out


def _capture(model: nn.Module, module: nn.Module, name: str, x: Tensor) -> Tensor:
    """`module`'s output on its first call in ``model(x)``; the forward stops right after it."""
    captured = []

    def hook(_module, _inputs, output):
        captured.append(output)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f'layer {name!r} was not called in the forward pass of the model')
    act = captured[0]
    if not isinstance(act, Tensor) or act.dim() < 2:
        what = tuple(act.shape) if isinstance(act, Tensor) else type(act).__name__
        raise ValueError(f'layer {name!r} must output an (N, C, ...) tensor to explain its neurons, got {what}')
    return act


def _find_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
    hint = f'close matches: {close}' if close else f'top-level modules: {[n for n, _ in model.named_children()]}'
    raise ValueError(f'unknown layer {name!r}; {hint} (names as in model.named_modules())')


def _expected_channels(model: nn.Module) -> Optional[int]:
    """Input channels of the model's first B-cos convolution (else first convolution), if any."""
    for kind in (BcosConv2d, nn.Conv2d):
        for m in model.modules():
            if isinstance(m, kind):
                return m.in_channels
    return None


def _encode(model: nn.Module, x: Tensor) -> Tensor:
    """Validate `x`, encode 3-channel images with `AddInverse`, move to the model's device and dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f'explain expects a torch.Tensor, got {type(x).__name__}')
    if not x.is_floating_point():
        raise TypeError(f'explain expects a floating point tensor, got dtype {x.dtype}')
    if x.dim() != 4:
        hint = ' (add a batch dimension: x.unsqueeze(0))' if x.dim() == 3 else ''
        raise ValueError(f'explain expects a batch of images (N, C, H, W), got shape {tuple(x.shape)}{hint}')
    if len(x) == 0:
        raise ValueError('explain got an empty batch')
    if not torch.isfinite(x).all():
        raise ValueError('explain got NaN or inf input values')
    expected = _expected_channels(model)
    if expected is not None and x.shape[1] != expected:
        if expected == 6 and x.shape[1] == 3:
            x = AddInverse()(x)  # checks the [0, 1] range
        else:
            also = ' or (N, 3, H, W) images in [0, 1]' if expected == 6 else ''
            raise ValueError(f'the model expects input of shape (N, {expected}, H, W){also}, got '
                             f'{tuple(x.shape)}')
    elif expected == 6:
        _check_encoding(x)
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        x = x.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else x.dtype)
    # A fresh leaf: never the caller's tensor (nor an inference tensor), whatever its grad state.
    return x.detach().clone().requires_grad_(True)


def _check_encoding(x: Tensor, atol: float = 1e-3) -> None:
    """A 6-channel input must be the encoding [x, 1-x] of images in [0, 1] (§4), as 3-channel ones are checked."""
    lo, hi = x.min().item(), x.max().item()
    gap = (x[:, :3] + x[:, 3:] - 1).abs().max().item()
    if lo < -atol or hi > 1 + atol or gap > atol:
        raise ValueError(f'explain expects the 6-channel encoding [x, 1-x] of images x in [0, 1] (AddInverse, paper '
                         f'§4) or the (N, 3, H, W) images themselves; got values in [{lo:.4g}, {hi:.4g}] whose '
                         f'channels 3-5 differ from 1 - channels 0-2 by up to {gap:.3g}')


def _as_index_tensor(value, what: str, device: torch.device) -> Tensor:
    try:
        t = torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f'{what} must be an int, a sequence of ints or an integer tensor, got {value!r}') from e
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f'{what} must hold integers, got dtype {t.dtype}')
    return t.long()


def _check_range(t: Tensor, size: int, what: str) -> Tensor:
    if t.numel() == 0:
        raise ValueError(f'no {what} to explain')
    if t.min() < 0 or t.max() >= size:
        bad = t[(t < 0) | (t >= size)].unique().tolist()
        raise ValueError(f'{what} must be in [0, {size}), got {bad}')
    return t


def _resolve_targets(target, k: Optional[int], out: Tensor) -> Tensor:
    """The (N, T) class indices to explain from `target` / `k` (see `explain`)."""
    n, c = out.shape
    if k is not None:
        if target is not None:
            raise ValueError('pass either target or k, not both')
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= c:
            raise ValueError(f'k must be an int in [1, {c}] (the number of classes), got {k!r}')
        return out.topk(k, dim=1).indices
    if target is None:
        return out.argmax(1, keepdim=True)
    t = _as_index_tensor(target, 'target', out.device)
    if t.dim() == 0:
        t = t.expand(n, 1)
    elif t.dim() == 1:
        if len(t) != n:
            raise ValueError(f'a 1-D target gives one class per image: expected {n} entries, got {len(t)} '
                             f'(for several classes per image pass an (N, T) tensor, or k=...)')
        t = t[:, None]
    elif t.dim() != 2 or t.shape[0] != n:
        raise ValueError(f'target must be an int, {n} ints or an ({n}, T) tensor, got shape {tuple(t.shape)}')
    return _check_range(t, c, 'target classes')


def _resolve_neurons(neuron, n: int, c: int, device: torch.device) -> Tensor:
    """The (N, T) channels of a layer to explain (see `explain`)."""
    if neuron is None:
        raise ValueError('layer=... needs neuron=... (the channel index to explain)')
    t = _as_index_tensor(neuron, 'neuron', device)
    if t.dim() <= 1:
        t = t.reshape(1, -1).expand(n, -1)
    elif t.dim() != 2 or t.shape[0] != n:
        raise ValueError(f'neuron must be an int, a sequence of ints or an ({n}, T) tensor, got shape '
                         f'{tuple(t.shape)}')
    return _check_range(t, c, f'neuron (channels of a {c}-channel layer)')


def _resolve_position(position: Sequence[int], spatial: torch.Size) -> Tuple[int, ...]:
    pos = tuple(int(p) for p in position)
    if len(pos) != len(spatial) or any(not 0 <= p < s for p, s in zip(pos, spatial)):
        raise ValueError(f'position must give {len(spatial)} indices within the layer\'s spatial size '
                         f'{tuple(spatial)}, got {tuple(position)}')
    return pos
