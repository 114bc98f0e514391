"""Fused MaxOut + B-cos transform with a hand-written backward (paper Eqs. 3, 9, 17).

A B-cos unit computes ``y = (ŵ·x) * |c|^(B-1) / scale`` with ``c = (ŵ·x) / ||x||`` (Eq. 9), after
a MaxOut over ``max_out`` linear units per output (Eq. 17). ``||x||`` is the norm of the patch
(or vector) that the unit sees. Autograd through that formula keeps several full-size
intermediates and runs a dozen element-wise kernels per layer; this Function keeps only the
selected linear output and a MaxOut mask, recomputes the cheap terms in the backward and calls
the convolution / matmul backward once.

Patch norms are summed over channels first (one channel per conv group), then over the window,
so they cost a small fraction of the convolution. They are computed in float32 (float64 for
float64 inputs): sums of squares overflow float16 long before the inputs do.

In explanation mode (§3.2.1) the dynamic scale is treated as a constant: the backward then
yields exactly the rows of the dynamic linear map W(x) (Eq. 10-14).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['NORM_EPS', 'ConvGeometry', 'LinearGeometry', 'bcos_apply', 'from_reference_layout', 'to_reference_layout']

# Added to the squared patch norm, always held in float32 or float64: safe under fp16/bf16 autocast.
NORM_EPS = 1e-6


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class ConvGeometry:
    """The linear map, unit layout and patch norms of a B-cos 2-D convolution.

    The input reaching it is already padded for non-zero padding modes (``padding`` is then 0),
    so the patch norms see exactly the values the convolution sees.
    """

    def __init__(
            self,
            kernel_size: Tuple[int, int],
            stride: Tuple[int, int],
            padding: Tuple[int, int],
            dilation: Tuple[int, int],
            groups: int,
    ) -> None:
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self._area = kernel_size[0] * kernel_size[1]
        if kernel_size == (1, 1) and stride == (1, 1) and padding == (0, 0):
            self._window = 'identity'
        elif dilation == (1, 1) and all(p <= k // 2 for p, k in zip(padding, kernel_size)):
            self._window = 'pool'  # avg_pool2d allows padding up to half the kernel
        else:
            self._window = 'conv'

    def linear(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def linear_backward(
            self, grad: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool,
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, w, None, self.stride, self.padding, self.dilation, False, [0, 0],
            self.groups, [need_x, need_w, False])
        return gx, gw

    def unit_view(self, lin: Tensor, max_out: int) -> Tensor:
        """(N, G*M*Og, H, W) -> (N, G, M, Og, H, W)."""
        return lin.unflatten(1, (self.groups, max_out, -1))

    def flat(self, lin: Tensor) -> Tensor:
        """Inverse of `unit_view`."""
        return lin.flatten(1, 3)

    def grad_view(self, grad: Tensor) -> Tensor:
        """(N, G*Og, H, W) -> (N, G, Og, H, W)."""
        return grad.unflatten(1, (self.groups, -1))

    def output_shape(self, lin_shape: torch.Size) -> Tuple[int, ...]:
        n, g, _, o, h, w = lin_shape
        return n, g * o, h, w

    def _window_sum(self, q: Tensor) -> Tensor:
        """Sum of `q` (N, G, H, W) over every conv window: avg-pool (fast) or a ones-kernel conv."""
        if self._window == 'identity':
            return q
        if self._window == 'pool':
            return F.avg_pool2d(q, self.kernel_size, self.stride, self.padding).mul_(self._area)
        ones = q.new_ones((self.groups, 1) + tuple(self.kernel_size))
        return F.conv2d(q, ones, None, self.stride, self.padding, self.dilation, self.groups)

    def _window_sum_backward(self, grad: Tensor, shape: Tuple[int, ...]) -> Tensor:
        if self._window == 'identity':
            return grad
        if self._window == 'pool':
            like = grad.new_empty(()).expand(shape)  # only its shape is read
            return torch.ops.aten.avg_pool2d_backward(
                grad, like, self.kernel_size, self.stride, self.padding, False, True, None).mul_(self._area)
        ones = grad.new_ones((self.groups, 1) + tuple(self.kernel_size))
        return torch.nn.grad.conv2d_input(shape, ones, grad, self.stride, self.padding, self.dilation, self.groups)

    def patch_sq_norm(self, x: Tensor) -> Tensor:
        """Squared norm of each input patch, per group: (N, G, 1, H', W')."""
        acc = _accumulate_dtype(x.dtype)
        xg = x.unflatten(1, (self.groups, -1))
        q = (xg if xg.dtype == acc else xg.to(acc)).square().sum(2)
        return self._window_sum(q).unsqueeze(2)

    def patch_sq_norm_backward(self, grad_q: Tensor, x: Tensor, grad_x: Tensor) -> None:
        """Add d(patch_sq_norm)/dx ``^T grad_q`` to ``grad_x`` in place."""
        n, _, h, w = x.shape
        t = self._window_sum_backward(grad_q.squeeze(2), (n, self.groups, h, w))
        grad_x.unflatten(1, (self.groups, -1)).addcmul_(
            x.unflatten(1, (self.groups, -1)), t.unsqueeze(2).to(x.dtype), value=2)


class LinearGeometry:
    """The linear map, unit layout and input norms of a B-cos linear layer on (L, in) inputs."""

    groups = 1

    def linear(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w)

    def linear_backward(
            self, grad: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool,
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        return (grad @ w if need_x else None), (grad.t() @ x if need_w else None)

    def unit_view(self, lin: Tensor, max_out: int) -> Tensor:
        """(L, M*O) -> (L, 1, M, O, 1, 1)."""
        return lin.view(lin.shape[0], 1, max_out, -1, 1, 1)

    def flat(self, lin: Tensor) -> Tensor:
        """Inverse of `unit_view`."""
        return lin.reshape(lin.shape[0], -1)

    def grad_view(self, grad: Tensor) -> Tensor:
        """(L, O) -> (L, 1, O, 1, 1)."""
        return grad.reshape(grad.shape[0], 1, -1, 1, 1)

    def output_shape(self, lin_shape: torch.Size) -> Tuple[int, ...]:
        return lin_shape[0], lin_shape[3]

    def patch_sq_norm(self, x: Tensor) -> Tensor:
        acc = _accumulate_dtype(x.dtype)
        return (x if x.dtype == acc else x.to(acc)).square().sum(1).view(-1, 1, 1, 1, 1)

    def patch_sq_norm_backward(self, grad_q: Tensor, x: Tensor, grad_x: Tensor) -> None:
        grad_x.addcmul_(x, grad_q.view(-1, 1).to(x.dtype), value=2)


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


def _maxout(lin: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """MaxOut over dim 2 of (N, G, M, Og, H, W) (Eq. 17): the selected values and the winners."""
    m = lin.shape[2]
    if m == 1:
        return lin[:, :, 0], None
    if m == 2:
        first, second = lin[:, :, 0], lin[:, :, 1]
        return torch.maximum(first, second), torch.ge(first, second)
    return lin.max(dim=2)


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


def _unit_normalise(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Each unit's weights (a row of the flattened weight) scaled to unit norm, and 1 / norm."""
    flat = weight.flatten(1)
    inv_norm = torch.linalg.vector_norm(flat, dim=1, keepdim=True).clamp_min(1e-12).reciprocal_()
    return (flat * inv_norm).view_as(weight), inv_norm


def _unit_normalise_backward(grad_w_hat: Tensor, w_hat: Tensor, inv_norm: Tensor) -> Tensor:
    """d(w / ||w||)/dw applied to a gradient: (g - ŵ (ŵ·g)) / ||w||, in place on `grad_w_hat`."""
    g, w_hat = grad_w_hat.flatten(1), w_hat.flatten(1)
    dot = torch.bmm(g.unsqueeze(1), w_hat.unsqueeze(2)).view(-1, 1)  # row dots without a full-size temp
    return g.addcmul_(w_hat, dot, value=-1).mul_(inv_norm).view_as(grad_w_hat)


class _BcosFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, geometry, max_out, b, scale, detach, dtype):
        ctx.x_dtype = x.dtype
        x = x.to(dtype)
        w_hat, inv_norm = _unit_normalise(weight)
        w_compute = w_hat.to(dtype)
        lin = geometry.unit_view(geometry.linear(x, w_compute), max_out)
        sel, winners = _maxout(lin)
        norm = None if b == 1 else geometry.patch_sq_norm(x).add_(NORM_EPS).sqrt_()
        # The output is allocated in its final layout and filled through a view: returning a view
        # would forbid in-place ops on it (timm's residual `x += shortcut`).
        out = sel.new_empty(geometry.output_shape(lin.shape))
        y = geometry.grad_view(out)
        if b == 1:
            torch.mul(sel, 1.0 / scale, out=y)
        else:
            _dynamic_scale(sel, norm, b, scale, out=y).mul_(sel)
        ctx.geometry, ctx.b, ctx.scale, ctx.detach, ctx.lin_shape = geometry, b, scale, detach, lin.shape
        # The normalised weight is recomputed in backward (one product), not kept: a weight-sized
        # tensor per layer less between forward and backward (benchmarks/memory.py).
        ctx.save_for_backward(x, weight, inv_norm, sel, winners, norm)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, inv_norm, sel, winners, norm = ctx.saved_tensors
        w_hat = (weight.flatten(1) * inv_norm).view_as(weight)
        w_compute = w_hat.to(x.dtype)
        geometry, b = ctx.geometry, ctx.b
        need_x, need_w = ctx.needs_input_grad[:2]
        # dy/dsel = B |c|^(B-1) / scale; in explanation mode |c|^(B-1) is a constant: 1 instead of B.
        factor = 1.0 if ctx.detach else b
        grad_sel = _dynamic_scale(sel, norm, b, ctx.scale, factor)
        grad_sel = geometry.grad_view(grad_y) * grad_sel if b == 1 else grad_sel.mul_(geometry.grad_view(grad_y))
        grad_lin = None if ctx.lin_shape[2] == 1 else sel.new_empty(ctx.lin_shape)
        grad_q = None
        if b != 1 and not ctx.detach and need_x:
            # dy/d||x|| = -(B-1) y / ||x|| and d||x||/dq = 1 / (2 ||x||) for q = ||x||^2, with
            # sum_o g * y = sum_o grad_sel * sel / B. The product goes into a half of the MaxOut
            # gradient buffer when it can: one large allocation less.
            scratch = grad_lin is not None and grad_sel.dtype == sel.dtype
            prod = torch.mul(grad_sel, sel, out=grad_lin[:, :, 0]) if scratch else grad_sel * sel
            grad_q = prod.sum(2, keepdim=True).mul_((1 - b) / (2 * b)) / norm.square()
        grad_lin = geometry.flat(_maxout_backward(grad_sel, winners, grad_lin, sel.dtype))
        if x.dtype == torch.float16 and need_w:
            # Weight gradients sum over the whole batch and overflow float16 (not bfloat16): float32.
            grad_x, _ = geometry.linear_backward(grad_lin, x, w_compute, need_x, False)
            _, grad_w = geometry.linear_backward(grad_lin.float(), x.float(), w_hat.float(), False, True)
        else:
            grad_x, grad_w = geometry.linear_backward(grad_lin, x, w_compute, need_x, need_w)
        if grad_q is not None:
            geometry.patch_sq_norm_backward(grad_q, x, grad_x)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        if grad_w is not None:
            grad_w = _unit_normalise_backward(grad_w.to(w_hat.dtype), w_hat, inv_norm)
        return grad_x, grad_w, None, None, None, None, None, None


def _bcos_traceable(x: Tensor, weight: Tensor, geometry, max_out: int, b: float, scale: float, detach: bool,
                    dtype: torch.dtype) -> Tensor:
    """The same transform in plain differentiable ops, for torch.compile and torch.export: the
    compiler derives the backward (with the dynamic scale detached in explanation mode) and fuses
    the element-wise work that `_BcosFunction` hand-writes for eager mode.

    The unit norm scales the linear output (per channel, fused with MaxOut) instead of the weight:
    no normalised copy of the weight is written and read back, and the weight gradient needs fewer
    weight-sized passes: a compiled resnet18 training step at batch 8, 96 px took 15-19% less time
    with MaxOut 1 and 20-30% less with MaxOut 2."""
    w_norm = torch.linalg.vector_norm(weight.flatten(1), dim=1)
    # An all-zero unit outputs 0 whatever it is scaled by: 1, not 1e12, which would overflow the
    # fp16 gradient of its output into inf and then 0 * inf = NaN in the input gradient.
    inv_norm = torch.where(w_norm > 0, w_norm, 1.0).reciprocal()
    lin = geometry.unit_view(geometry.linear(x.to(dtype), weight.to(dtype)), max_out)
    inv_norm = inv_norm.clamp_max(torch.finfo(lin.dtype).max).to(lin.dtype)
    lin = lin * inv_norm.view((1,) + lin.shape[1:4] + (1, 1))
    # MaxOut (Eq. 17) without `max(dim)`, whose backward keeps int64 indices and scatters.
    if max_out == 1:
        sel = lin[:, :, 0]
    elif max_out == 2:
        sel = torch.maximum(lin[:, :, 0], lin[:, :, 1])
    else:
        sel = lin.amax(dim=2)
    if b == 1:
        y = sel / scale
    else:
        x_acc = x.to(_accumulate_dtype(x.dtype))
        norm = geometry.patch_sq_norm(x_acc).add(NORM_EPS).sqrt()
        cos = sel.abs() / norm
        if b < 2:  # d|c|^(B-1)/d|c| is infinite at c = 0: |c| >= tiny keeps the gradient finite
            cos = cos.clamp_min(torch.finfo(cos.dtype).tiny)
        dynamic = cos ** (b - 1) / scale  # |c|^(B-1) / scale (Eq. 9)
        y = sel * (dynamic.detach() if detach else dynamic).to(sel.dtype)
    return y.reshape(geometry.output_shape(lin.shape))


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
    if torch.compiler.is_compiling():  # torch.compile / torch.export: plain ops the compiler can fuse
        return _bcos_traceable(x, weight, geometry, max_out, b, scale, detach, dtype)
    return _BcosFunction.apply(x, weight, geometry, max_out, b, scale, detach, dtype)


def from_reference_layout(weight: Tensor, max_out: int, groups: int = 1) -> Tensor:
    """Reorder MaxOut units from the reference layout (row ``o * M + m``, B-cos v1/v2) to ours.

    Ours is (group, unit, output): row ``g * M * Og + m * Og + o'``, so the MaxOut partners are
    contiguous channel blocks of the convolution output. Identity for ``max_out == 1``.
    """
    if max_out == 1:
        return weight
    return weight.view(groups, -1, max_out, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def to_reference_layout(weight: Tensor, max_out: int, groups: int = 1) -> Tensor:
    """Inverse of `from_reference_layout`."""
    if max_out == 1:
        return weight
    return weight.view(groups, max_out, -1, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def default_scale(fan_in: int, scale_factor: float) -> float:
    """v1's output divisor ``k * sqrt(C_in) / scale_factor`` written as ``sqrt(fan_in) / scale_factor``."""
    return math.sqrt(fan_in) / scale_factor
