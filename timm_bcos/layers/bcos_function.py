"""Fused MaxOut + B-cos transform with a hand-written backward (paper Eqs. 3, 9, 17).

A B-cos unit computes ``y = (ŵ·x) * |c|^(B-1) / scale`` with ``c = (ŵ·x) / ||x||`` (Eq. 9), after
a MaxOut over ``max_out`` linear units per output (Eq. 17). ``||x||`` is the norm of the patch
(or vector) that the unit sees. Autograd through that formula keeps several full-size
intermediates and runs a dozen element-wise kernels per layer; this Function keeps only the
selected linear output and a MaxOut mask, recomputes the cheap terms in the backward and calls
the convolution / matmul backward once. The same code serves eager mode (an autograd Function)
and torch.compile on CPU (two custom ops); `_bcos_traceable` writes it in plain ops for the
compiler to fuse (GPUs, MaxOut 1, and inference without gradients on CPU).

The unit norms 1/||w|| scale the weight or, where that is smaller, the linear output per channel
(`_scales_output`): deep layers have far more weight than output elements.

Patch norms are summed over channels first (one channel per conv group), then over the window,
so they cost a small fraction of the convolution. They are computed in float32 (float64 for
float64 inputs): sums of squares overflow float16 long before the inputs do.

In explanation mode (§3.2.1) the dynamic scale is treated as a constant: the backward then
yields exactly the rows of the dynamic linear map W(x) (Eq. 10-14), and the Function keeps that
scale instead of the selected output, all the backward then needs of it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from .bcos_geometry import NORM_EPS, accumulate_dtype, geometry_from_spec
from .zero_inputs import skips_zero_inputs

__all__ = ['bcos_apply']

# An explanation-mode layer on CPU whose linear output is larger runs over the batch in chunks (`_chunk_rows`).
CHUNK_BYTES = 16 * 2 ** 20


def _dynamic_scale(sel: Tensor, norm: Optional[Tensor], b: float, scale: float, factor: float = 1.0,
                   out: Optional[Tensor] = None):
    """``factor * |c|^(B-1) / scale`` for the selected units (Eq. 9, 11), in `out` or a new tensor.

    Constant factors are folded into the small per-patch tensor, so this costs two passes over
    `sel`. Half-precision `sel` gives a float32 result unless `out` says otherwise.
    """
    if b == 1:
        return factor / scale
    if b == 2:
        return torch.abs(sel, out=out).mul_(factor / (norm * scale))
    return torch.abs(sel, out=out).mul_((factor / scale) ** (1.0 / (b - 1)) / norm).pow_(b - 1)


def _maxout(lin: Tensor, need_winners: bool = True,
            winners: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """MaxOut over dim 2 of (N, G, M, Og, H, W) (Eq. 17): the selected values and the winners (into
    `winners` if given)."""
    m = lin.shape[2]
    if m == 1:
        return lin[:, :, 0], None
    if not need_winners:
        return (torch.maximum(lin[:, :, 0], lin[:, :, 1]) if m == 2 else lin.amax(dim=2)), None
    if m == 2:
        first, second = lin[:, :, 0], lin[:, :, 1]
        return torch.maximum(first, second), torch.ge(first, second, out=winners)
    if winners is None:
        return lin.max(dim=2)
    return torch.max(lin, 2, out=(lin.new_empty(winners.shape), winners))


def _maxout_backward(grad_sel: Tensor, winners: Optional[Tensor], grad_lin: Optional[Tensor], dtype: torch.dtype):
    """Route the gradient of the selected units to the MaxOut winners, into `grad_lin` (N, G, M, Og, H, W)."""
    if grad_lin is None:  # max_out == 1
        return grad_sel.unsqueeze(2).to(dtype)
    if grad_lin.shape[2] == 2:
        # Float mask products into the strided halves. On CPU this is ~10x faster than torch.where
        # or a bool mask, and the mask converts fastest from its uint8 view.
        first, second = grad_lin[:, :, 0], grad_lin[:, :, 1]
        second.copy_(winners.view(torch.uint8))
        torch.mul(grad_sel, second, out=first)
        torch.sub(grad_sel, first, out=second)
        return grad_lin
    return grad_lin.zero_().scatter_(2, winners.unsqueeze(2), grad_sel.unsqueeze(2).to(dtype))


def _per_unit(t: Tensor, weight: Tensor) -> Tensor:
    """An (O, 1) per-unit tensor viewed to broadcast over `weight` (O, ...)."""
    return t.view((-1,) + (1,) * (weight.dim() - 1))


def _inv_norm(weight: Tensor) -> Tensor:
    """1 / ||w|| per unit (output row of the weight), (O, 1). An all-zero unit outputs 0
    whatever it is scaled by: 1, not 1e12, which would overflow the fp16 gradient of its output
    into inf and then 0 * inf = NaN in the input gradient. Reduced over the weight's own dims, not
    a flattened copy: a channels-last weight does not flatten as a view."""
    norm = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim()))).unsqueeze(1)
    return torch.where(norm > 0, norm, 1.0).reciprocal_()


def _scales_output(geometry, x: Tensor, weight: Tensor) -> bool:
    """Where to apply the unit norms 1/||w||: to the linear output (per channel) or to the weight.

    Both give ``ŵ·x``; they differ in memory traffic. Scaling the weight costs three read-write
    passes over it (normalise; recompute and chain rule in the backward), scaling the output two
    over the output (forward, and its gradient). Deep layers with small outputs and large weights
    (512 channels at 7 px: 60x more weight than output at batch 8) scale the output."""
    return 2 * geometry.output_numel(x, weight) < 3 * weight.numel()


def _unit_dot(a: Tensor, weight: Tensor) -> Tensor:
    """The dot product of each unit's row of `a` with its row of `weight`, (O, 1)."""
    if a.is_contiguous() and weight.is_contiguous():
        # 2-4x faster than a batched (1, K) x (K, 1) bmm on CPU
        return torch.linalg.vecdot(a.flatten(1), weight.flatten(1)).unsqueeze(1)
    return (a * weight).sum(tuple(range(1, weight.dim()))).unsqueeze(1)  # channels-last: rows are not views


def _unit_norm_backward(grad_w: Tensor, weight: Tensor, inv_norm: Tensor, dot: Optional[Tensor]) -> Tensor:
    """The weight gradient through ``ŵ = w / ||w||``: ``(g - ŵ (ŵ·g)) / ||w||`` for the gradient g
    of ŵ, in place on `grad_w`. `dot` None: `grad_w` is g (weight scaled). Else `grad_w` is already
    ``g / ||w||`` and `dot` is ``ŵ·g`` (output scaled)."""
    if dot is None:
        dot = _unit_dot(grad_w.mul_(_per_unit(inv_norm, weight)), weight)
    return grad_w.addcmul_(weight, _per_unit(dot * inv_norm.square(), weight), value=-1)


def _unit_scale_view(inv_norm: Tensor, lin: Tensor) -> Tensor:
    """The (O, 1) unit scales in `lin`'s dtype (float16 clamped), viewed to broadcast over `lin`:
    its (N, G, M, Og, H, W) unit view, or the linear map's own (N, O, ...) output."""
    if lin.dtype != inv_norm.dtype:
        inv_norm = inv_norm.clamp_max(torch.finfo(lin.dtype).max).to(lin.dtype)
    if lin.dim() == 6:
        return inv_norm.view((1,) + lin.shape[1:4] + (1, 1))
    return inv_norm.view((1, -1) + (1,) * (lin.dim() - 2))


def _keeps_scale(b: float, detach: bool) -> bool:
    """Explanation mode keeps the dynamic scale for the backward instead of the selected units: with
    the scale a constant (§3.2.1) it is all the backward needs of them, one product instead of three
    passes (benchmarks/explain.py)."""
    return detach and b != 1


def _chunk_rows(geometry, x: Tensor, weight: Tensor, max_out: int, b: float, detach: bool) -> int:
    """Images per chunk of an explanation-mode layer on CPU: its linear output (all MaxOut units)
    and the convolution's own scratch stay under `CHUNK_BYTES` a chunk; ``len(x)`` where they
    already do. glibc's malloc maps each block over 32 MB afresh and page-faults it in on first
    write: the first layer of bcos_resnet18 (32 images at 128 px) wrote 64 MB of linear
    output and 64 MB of oneDNN scratch, ~33,000 faults a forward (README, Speed). The images are
    independent: the results are the same, to rounding where a chunk scales its output instead of
    the weight (`_scales_output`). Channels-first real tensors only (the compiler's fake tensors
    describe the whole batch: the same shapes and strides)."""
    if not (_keeps_scale(b, detach) and x.device.type == 'cpu' and x.dim() == 4
            and x.is_contiguous() and geometry.memory_format(x, weight) == torch.contiguous_format
            and not isinstance(x, FakeTensor)):
        return len(x)
    return max(1, CHUNK_BYTES // (geometry.output_numel(x[:1], weight) * x.element_size()))


def _rows(t: Optional[Tensor], start: int, rows: int) -> Optional[Tensor]:
    """Rows ``start:start + rows`` of an optional per-image tensor (the winners: None for MaxOut 1)."""
    return None if t is None else t[start:start + rows]


def _chunked_forward(x: Tensor, weight: Tensor, geometry, max_out: int, b: float, scale: float, dtype: torch.dtype,
                     rows: int):
    """`_bcos_forward` of an explanation-mode layer, `rows` images at a time, into whole-batch outputs."""
    out = torch.empty(geometry.output_size(x, weight, max_out), dtype=dtype, device=x.device)
    kept = torch.empty(geometry.grad_view(out).shape, dtype=dtype, device=x.device)
    winners = None if max_out == 1 else torch.empty(kept.shape, dtype=torch.bool if max_out == 2 else torch.int64,
                                                    device=x.device)
    norms = []
    for i in range(0, len(x), rows):
        _, _, inv_norm, _, _, norm = _bcos_forward(x[i:i + rows], weight, geometry, max_out, b, scale, dtype,
                                                   detach=True, into=(out[i:i + rows], kept[i:i + rows],
                                                                      _rows(winners, i, rows)))
        norms.append(norm)
    return out, x.to(dtype), inv_norm, kept, winners, torch.cat(norms)


def _bcos_forward(x: Tensor, weight: Tensor, geometry, max_out: int, b: float, scale: float, dtype: torch.dtype,
                  need_winners: bool = True, detach: bool = False, into: Optional[Tuple[Tensor, ...]] = None):
    """The forward pass: the output and what the backward needs, ``(out, x, inv_norm, kept, winners, norm)``
    (``x`` cast to `dtype`; `kept` the selected units, or their dynamic scale where `_keeps_scale`;
    `winners` None for MaxOut 1 or without `need_winners`, `norm` None for B = 1). `into`: the
    buffers for ``(out, kept, winners)`` of a chunk (`_chunked_forward`)."""
    if into is None and need_winners:
        rows = _chunk_rows(geometry, x, weight, max_out, b, detach)
        if rows < len(x):
            return _chunked_forward(x, weight, geometry, max_out, b, scale, dtype, rows)
    x = x.to(dtype)
    inv_norm = _inv_norm(weight)
    if _scales_output(geometry, x, weight):
        lin = geometry.unit_view(geometry.linear(x, weight.to(dtype)), max_out)
        lin.mul_(_unit_scale_view(inv_norm, lin))
    else:
        w_hat = weight * _per_unit(inv_norm, weight)
        lin = geometry.unit_view(geometry.linear(x, w_hat.to(dtype)), max_out)
    sel, winners = _maxout(lin, need_winners, None if into is None else into[2])
    norm = None if b == 1 else geometry.patch_sq_norm(x).add_(NORM_EPS).sqrt_()
    # The output is allocated in its final layout and filled through a view: returning a view
    # would forbid in-place ops on it (timm's residual `x += shortcut`).
    out = into[0] if into is not None else torch.empty(
        geometry.output_shape(lin.shape), dtype=sel.dtype, device=sel.device,
        memory_format=geometry.memory_format(x, weight))
    y = geometry.grad_view(out)
    kept = sel
    if b == 1:
        torch.mul(sel, 1.0 / scale, out=y)
    elif _keeps_scale(b, detach):
        kept = _dynamic_scale(sel, norm, b, scale, out=torch.empty_like(sel) if into is None else into[1])
        torch.mul(kept, sel, out=y)
    else:
        _dynamic_scale(sel, norm, b, scale, out=y).mul_(sel)
    return out, x, inv_norm, kept, winners, norm


def _bcos_backward(
        grad_y: Tensor, x: Tensor, weight: Tensor, inv_norm: Tensor, kept: Tensor, winners: Optional[Tensor],
        norm: Optional[Tensor], geometry, max_out: int, b: float, scale: float, detach: bool,
        need_x: bool, need_w: bool, x_dtype: torch.dtype,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of `_bcos_forward`'s output for its input (in `x_dtype`) and weight, from its saved tensors.

    Where the forward scaled the weight, the normalised weight is recomputed here (one product),
    not kept: a weight-sized tensor per layer less between forward and backward (benchmarks/memory.py).
    An explanation's input gradient goes by chunks of images, as its forward (`_chunk_rows`)."""
    rows = _chunk_rows(geometry, x, weight, max_out, b, detach) if need_x and not need_w else len(x)
    if rows < len(x):
        return torch.cat([_bcos_backward(
            grad_y[i:i + rows], x[i:i + rows], weight, inv_norm, kept[i:i + rows], _rows(winners, i, rows),
            norm[i:i + rows], geometry, max_out, b, scale, detach, True, False, x_dtype)[0]
            for i in range(0, len(x), rows)]), None
    scaled_output = _scales_output(geometry, x, weight)
    w_used = weight if scaled_output else weight * _per_unit(inv_norm, weight)
    keeps_scale = _keeps_scale(b, detach)
    sel = None if keeps_scale else kept
    grad_lin = None
    if max_out > 1:  # (N, G, M, Og, H, W), in the layout of the convolution output
        flat_shape = (kept.shape[0], kept.shape[1] * max_out * kept.shape[2]) + kept.shape[3:]
        grad_lin = geometry.unit_view(torch.empty(flat_shape, dtype=x.dtype, device=x.device,
                                                  memory_format=geometry.memory_format(x, weight)), max_out)
    if keeps_scale and max_out == 2:
        # dy/dsel (the kept scale) times the output gradient, written straight into the second
        # unit's half of the MaxOut gradient and routed in place (`_maxout_backward`'s products).
        first, second = grad_lin[:, :, 0], grad_lin[:, :, 1]
        torch.mul(kept, geometry.grad_view(grad_y), out=second)
        first.copy_(winners.view(torch.uint8))
        first.mul_(second)
        second.sub_(first)
        return _linear_output_backward(grad_lin, x, weight, w_used, inv_norm, sel, None, geometry, scaled_output,
                                       need_x, need_w, x_dtype)
    if keeps_scale:
        grad_sel = kept * geometry.grad_view(grad_y)
    else:
        # dy/dsel = B |c|^(B-1) / scale; in explanation mode |c|^(B-1) is a constant: 1 instead of B.
        grad_sel = _dynamic_scale(sel, norm, b, scale, 1.0 if detach else b)
        grad_sel = geometry.grad_view(grad_y) * grad_sel if b == 1 else grad_sel.mul_(geometry.grad_view(grad_y))
    grad_q = None
    if b != 1 and not detach and need_x:
        # dy/d||x|| = -(B-1) y / ||x|| and d||x||/dq = 1 / (2 ||x||) for q = ||x||^2, with
        # sum_o g * y = sum_o grad_sel * sel / B. The product goes into a half of the MaxOut
        # gradient buffer when it can: one large allocation less.
        scratch = grad_lin is not None and grad_sel.dtype == sel.dtype
        prod = torch.mul(grad_sel, sel, out=grad_lin[:, :, 0]) if scratch else grad_sel * sel
        grad_q = prod.sum(2, keepdim=True).mul_((1 - b) / (2 * b)) / norm.square()
    grad_lin = _maxout_backward(grad_sel, winners, grad_lin, x.dtype)
    return _linear_output_backward(grad_lin, x, weight, w_used, inv_norm, sel, grad_q, geometry, scaled_output,
                                   need_x, need_w, x_dtype)


def _linear_output_backward(
        grad_lin: Tensor, x: Tensor, weight: Tensor, w_used: Tensor, inv_norm: Tensor, sel: Optional[Tensor],
        grad_q: Optional[Tensor], geometry, scaled_output: bool, need_x: bool, need_w: bool, x_dtype: torch.dtype,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """`_bcos_backward` from the gradient of the linear output `grad_lin` (N, G, M, Og, H, W) on: the
    unit norms, the convolution / matmul backward, the patch norms' term `grad_q` (if any)."""
    dot = None
    if scaled_output:
        if need_w and sel is not None:
            # ŵ·g for each unit from its (small) output, not its (large) weight: the sum over
            # positions of grad_lin * ŵ·x, where ŵ·x = sel wherever the unit's gradient is not 0.
            acc = accumulate_dtype(sel.dtype)
            dot = (grad_lin.to(acc) * sel.unsqueeze(2)).sum((0, 4, 5)).view(-1, 1).to(weight.dtype)
        grad_lin = grad_lin.mul_(_unit_scale_view(inv_norm, grad_lin))
    grad_lin = geometry.flat(grad_lin)
    w_compute = w_used.to(x.dtype)
    if x.dtype == torch.float16 and need_w:
        # Weight gradients sum over the whole batch and overflow float16 (not bfloat16): float32.
        grad_x, _ = geometry.linear_backward(grad_lin, x, w_compute, need_x, False)
        _, grad_w = geometry.linear_backward(grad_lin.float(), x.float(), w_used.float(), False, True)
    else:
        grad_x, grad_w = geometry.linear_backward(grad_lin, x, w_compute, need_x, need_w)
    if grad_q is not None:
        geometry.patch_sq_norm_backward(grad_q, x, grad_x)
    if grad_x is not None:
        grad_x = grad_x.to(x_dtype)
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
        if scaled_output and dot is None:
            # Without the selected units (explanation mode keeps the scale): ŵ·g from the weight,
            # as grad_w is g / ||w|| here.
            dot = _unit_dot(grad_w, weight)
        grad_w = _unit_norm_backward(grad_w, weight, inv_norm, dot)
    return grad_x, grad_w


class _BcosFunction(torch.autograd.Function):
    """Eager mode: `_bcos_forward` and `_bcos_backward` as one autograd node."""

    @staticmethod
    def forward(ctx, x, weight, geometry, max_out, b, scale, detach, dtype):
        ctx.x_dtype = x.dtype
        out, x, inv_norm, kept, winners, norm = _bcos_forward(
            x, weight, geometry, max_out, b, scale, dtype, detach=detach)
        ctx.geometry, ctx.max_out, ctx.b, ctx.scale, ctx.detach = geometry, max_out, b, scale, detach
        ctx.save_for_backward(x, weight, inv_norm, kept, winners, norm)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x, grad_w = _bcos_backward(grad_y, *ctx.saved_tensors, ctx.geometry, ctx.max_out, ctx.b, ctx.scale,
                                        ctx.detach, need_x, need_w, ctx.x_dtype)
        return grad_x, grad_w, None, None, None, None, None, None


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Custom ops return tensors, not None: an empty stand-in."""
    return like.new_empty(0) if t is None else t


# The same forward and backward as two custom ops for torch.compile / torch.export: the compiler
# keeps them whole (opaque nodes) and fuses the rest of the network around them. Where they are
# used instead of `_bcos_traceable`: `_compiles_as_custom_op`.
def _bcos_forward_impl(
        x: Tensor, weight: Tensor, geometry: List[int], max_out: int, b: float, scale: float, detach: bool,
        dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, inv_norm, kept, winners, norm)`` (`kept`: see `_bcos_forward`)."""
    out, _, inv_norm, kept, winners, norm = _bcos_forward(
        x, weight, geometry_from_spec(tuple(geometry)), max_out, b, scale, dtype, detach=detach)
    return out, inv_norm, kept, _or_empty(winners, x), _or_empty(norm, x)


def _bcos_backward_impl(
        grad_y: Tensor, x: Tensor, weight: Tensor, inv_norm: Tensor, kept: Tensor, winners: Tensor, norm: Tensor,
        geometry: List[int], max_out: int, b: float, scale: float, detach: bool, need_x: bool, need_w: bool,
        dtype: torch.dtype,
) -> Tuple[Tensor, Tensor]:
    """``(grad_x, grad_w)`` of `_bcos_forward_op`, empty where not needed."""
    grad_x, grad_w = _bcos_backward(
        grad_y, x.to(dtype), weight, inv_norm, kept, winners if max_out > 1 else None, norm if b != 1 else None,
        geometry_from_spec(tuple(geometry)), max_out, b, scale, detach, need_x, need_w, x.dtype)
    return _or_empty(grad_x, x), _or_empty(grad_w, weight)


# The names carry the version of the ops' contract (their outputs' shapes, dtypes and strides):
# torch's on-disk compile caches key a compiled graph on the names of the ops in it, not on the
# code behind them, so a graph cached with an older contract would assert at run time. Version 2:
# outputs in the convolution's layout (channels-last models).
_OP_VERSION = 2
_bcos_forward_op = torch.library.custom_op(
    f'timm_bcos::bcos_forward_v{_OP_VERSION}', _bcos_forward_impl, mutates_args=())
_bcos_backward_op = torch.library.custom_op(
    f'timm_bcos::bcos_backward_v{_OP_VERSION}', _bcos_backward_impl, mutates_args=())
_FORWARD_OP = getattr(torch.ops.timm_bcos, f'bcos_forward_v{_OP_VERSION}')
_BACKWARD_OP = getattr(torch.ops.timm_bcos, f'bcos_backward_v{_OP_VERSION}')
# Shapes, dtypes and strides for tracing: the same code runs on fake tensors.
_bcos_forward_op.register_fake(_bcos_forward_impl)
_bcos_backward_op.register_fake(_bcos_backward_impl)


def _bcos_op_setup_context(ctx, inputs, output) -> None:
    x, weight, geometry, max_out, b, scale, detach, dtype = inputs
    _, inv_norm, kept, winners, norm = output
    ctx.save_for_backward(x, weight, inv_norm, kept, winners, norm)
    ctx.args = geometry, max_out, b, scale, detach
    ctx.dtype = dtype


def _bcos_op_backward(ctx, grad_y, *unused):
    need_x, need_w = ctx.needs_input_grad[:2]
    grad_x, grad_w = _BACKWARD_OP(
        grad_y, *ctx.saved_tensors, *ctx.args, need_x, need_w, ctx.dtype)
    return grad_x if need_x else None, grad_w if need_w else None, None, None, None, None, None, None


_bcos_forward_op.register_autograd(_bcos_op_backward, setup_context=_bcos_op_setup_context)


def _maxout_channels(lin: Tensor, groups: int, max_out: int) -> Tensor:
    """MaxOut (Eq. 17) on the linear map's (N, G*M*Og, ...) output, keeping its layout: unit m of a
    group is its m-th channel block. Without `max(dim)`, whose backward keeps int64 indices."""
    if max_out == 1:
        return lin
    if groups > 1:
        return lin.unflatten(1, (groups, max_out, -1)).amax(2).flatten(1, 2)
    units = lin.chunk(max_out, 1)
    sel = units[0]
    for unit in units[1:]:
        sel = torch.maximum(sel, unit)
    return sel


def _per_channel(q: Tensor, sel: Tensor) -> Tensor:
    """Per-group patch values (N, G, 1, ...) broadcast against the (N, G*Og, ...) output `sel`."""
    n, groups = q.shape[:2]
    if groups == 1:
        return q.reshape((n, 1) + sel.shape[2:])
    return q.expand((n, groups, sel.shape[1] // groups) + q.shape[3:]).reshape(sel.shape)


def _bcos_traceable(x: Tensor, weight: Tensor, geometry, max_out: int, b: float, scale: float, detach: bool,
                    dtype: torch.dtype) -> Tensor:
    """The same transform in plain differentiable ops, for torch.compile and torch.export: the
    compiler derives the backward (with the dynamic scale detached in explanation mode) and fuses
    the element-wise work that `_BcosFunction` hand-writes for eager mode.

    Every large tensor keeps the (N, C, H, W) shape of the convolution output, so it keeps the
    memory layout the compiler chose for the convolution (channels-last on CPU): the 6-D unit view
    made Inductor write some of them channels-first and transpose between the two in its kernels.
    The unit norm scales the linear output (per channel, fused with MaxOut) instead of the weight:
    no normalised copy of the weight is written and read back, and the weight gradient needs fewer
    weight-sized passes."""
    lin = geometry.linear(x.to(dtype), weight.to(dtype))
    sel = _maxout_channels(lin * _unit_scale_view(_inv_norm(weight), lin), geometry.groups, max_out)
    if b == 1:
        return sel / scale
    x_acc = x.to(accumulate_dtype(x.dtype))
    norm = _per_channel(geometry.patch_sq_norm(x_acc).add(NORM_EPS).sqrt(), sel)
    cos = sel.abs() / norm
    if b < 2:  # d|c|^(B-1)/d|c| is infinite at c = 0: |c| >= tiny keeps the gradient finite
        cos = cos.clamp_min(torch.finfo(cos.dtype).tiny)
    dynamic = cos ** (b - 1) / scale  # |c|^(B-1) / scale (Eq. 9)
    return sel * (dynamic.detach() if detach else dynamic).to(sel.dtype)


def _compiles_as_custom_op(x: Tensor, max_out: int) -> bool:
    """Under torch.compile: the hand-fused custom ops, or plain ops for the compiler to fuse.

    On CPU, with gradients and MaxOut 2, the compiler's fusion of `_bcos_traceable` is about as
    fast as the custom ops (resnet50 fwd+bwd, interleaved: 529 vs 523 ms; bcos_resnet18 explain:
    694 vs 713 ms, and 990 vs 993 ms once the custom ops took the first layer's input gradient
    from GEMM, which the traced form gives up; that layer alone as a custom op, the rest traced:
    1018 vs 1012 ms) and takes 80-125 s instead of 3-18 s to compile resnet50; with MaxOut 1, or
    without gradients (inference), it is faster. On a GPU it is much faster (bcos_resnet50 bf16
    training on an H200: 2172 images/s traced, 933 through the custom ops, 1084 eager;
    benchmarks/gpu.txt)."""
    return x.device.type == 'cpu' and max_out > 1 and torch.is_grad_enabled()


def bcos_apply(
        x: Tensor,
        weight: Tensor,
        geometry,
        max_out: int,
        b: float,
        scale: float,
        detach: bool,
) -> Tensor:
    """Apply the fused B-cos transform.

    Args:
        x: input, (N, C, H, W) for `ConvGeometry` or (L, in) for `LinearGeometry`.
        weight: the units' weights (not yet normalised), MaxOut units in (G, M, Og) order.
        geometry: a `ConvGeometry` or `LinearGeometry`.
        max_out: MaxOut units per output (Eq. 17).
        b: the exponent B (Eq. 3).
        scale: fixed output divisor.
        detach: explanation mode, the dynamic scale is a constant for autograd.
    """
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    if torch.compiler.is_compiling():  # torch.compile / torch.export
        if _compiles_as_custom_op(x, max_out):
            return _FORWARD_OP(x, weight, geometry.spec, max_out, b, scale, detach, dtype)[0]
        return _bcos_traceable(x, weight, geometry, max_out, b, scale, detach, dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _BcosFunction.apply(x, weight, geometry, max_out, b, scale, detach, dtype)
    # Inference: no autograd node, no MaxOut winners to keep.
    if skips_zero_inputs() and not x.any():
        return torch.empty(geometry.output_size(x, weight, max_out), dtype=dtype, device=x.device,
                           memory_format=geometry.memory_format(x, weight)).zero_()
    return _bcos_forward(x, weight, geometry, max_out, b, scale, dtype, need_winners=False)[0]
