"""Where a B-cos unit's linear map and patch norms come from: a 2-D convolution or a linear layer.

A geometry gives the linear map and its backward, the (N, G, M, Og, H, W) unit layout of its
output that MaxOut (Eq. 17) reduces, and the squared input norm ||x||^2 of each patch (Eq. 9),
with its backward. `spec` encodes it as ints for the custom ops (`geometry_from_spec`).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ['NORM_EPS', 'ConvGeometry', 'LinearGeometry', 'accumulate_dtype', 'geometry_from_spec']

# Added to the squared patch norm, always held in float32 or float64: safe under fp16/bf16 autocast.
NORM_EPS = 1e-6

# Convolutions with at most this many input channels take their input gradient from GEMM + col2im
# on CPU (`ConvGeometry._input_gradient_by_gemm`).
SMALL_INPUT_CHANNELS = 8


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where norms and sums are taken: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


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
        self.spec = [*kernel_size, *stride, *padding, *dilation, groups]  # the custom ops' argument
        self._area = kernel_size[0] * kernel_size[1]
        if kernel_size == (1, 1) and stride == (1, 1) and padding == (0, 0):
            self._window = 'identity'
        elif dilation == (1, 1) and all(p <= k // 2 for p, k in zip(padding, kernel_size)):
            self._window = 'pool'  # avg_pool2d allows padding up to half the kernel
        else:
            self._window = 'conv'

    def linear(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def memory_format(self, x: Tensor, w: Tensor) -> torch.memory_format:
        """The layout of ``linear(x, w)``: channels-last when `x` or `w` is (as PyTorch's CPU and
        cuDNN convolutions choose), so that a channels-last model's B-cos layers write their
        outputs and gradients channels-last too."""
        return torch.channels_last if _is_channels_last(x) or _is_channels_last(w) else torch.contiguous_format

    def output_numel(self, x: Tensor, w: Tensor) -> int:
        """Elements of ``linear(x, w)``, from the shapes alone."""
        return math.prod(self.output_size(x, w, 1))

    def output_size(self, x: Tensor, w: Tensor, max_out: int) -> Tuple[int, ...]:
        """The B-cos layer's output shape (after MaxOut over `max_out` units), from the shapes alone."""
        n, _, *size = x.shape
        spatial = [(s + 2 * p - d * (k - 1) - 1) // st + 1
                   for s, k, st, p, d in zip(size, self.kernel_size, self.stride, self.padding, self.dilation)]
        return (n, w.shape[0] // max_out, *spatial)

    def linear_backward(
            self, grad: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool,
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        if need_x and self._input_gradient_by_gemm(grad, x):
            gx = torch.ops.aten._slow_conv2d_backward(
                grad, x, w, self.kernel_size, self.stride, self.padding, [True, False, False])[0]
            return gx, self.linear_backward(grad, x, w, False, True)[1] if need_w else None
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, w, None, self.stride, self.padding, self.dilation, False, [0, 0],
            self.groups, [need_x, need_w, False])
        return gx, gw

    def _input_gradient_by_gemm(self, grad: Tensor, x: Tensor) -> bool:
        """Whether the input gradient goes through ATen's GEMM + col2im convolution backward instead
        of oneDNN's: on CPU, for inputs of at most `SMALL_INPUT_CHANNELS` channels, the first layer
        of every B-cos network (6 channels, Eq. 18), whose input gradient is what `explain` returns.
        oneDNN handles so few channels poorly: for bcos_resnet18's stem (6 -> 2x64 channels, 7x7,
        stride 2) at 128 px its input gradient took 157 ms, 1.7x the forward, and GEMM + col2im
        73 ms (benchmarks/conv_input_grad.py). Ungrouped, undilated, channels-first only, and real
        tensors only: the GEMM backward has no meta kernel, so the compiler's fake tensors (the
        custom ops' shapes) take oneDNN's, whose contiguous result has the same shape and strides."""
        return (x.device.type == 'cpu' and x.shape[1] <= SMALL_INPUT_CHANNELS and self.groups == 1
                and tuple(self.dilation) == (1, 1) and x.is_contiguous() and grad.is_contiguous()
                and not isinstance(x, FakeTensor))

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
        acc = accumulate_dtype(x.dtype)
        x = x if x.dtype == acc else x.to(acc)
        # Ungrouped: no 5-D view of x, whose layout torch.compile may choose apart from x's own.
        q = x.square().sum(1, keepdim=True) if self.groups == 1 else x.unflatten(1, (self.groups, -1)).square().sum(2)
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
    spec = []  # the custom ops' argument

    def linear(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w)

    def memory_format(self, x: Tensor, w: Tensor) -> torch.memory_format:
        return torch.contiguous_format

    def output_numel(self, x: Tensor, w: Tensor) -> int:
        return x.shape[0] * w.shape[0]

    def output_size(self, x: Tensor, w: Tensor, max_out: int) -> Tuple[int, ...]:
        return x.shape[0], w.shape[0] // max_out

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
        acc = accumulate_dtype(x.dtype)
        return (x if x.dtype == acc else x.to(acc)).square().sum(1).view(-1, 1, 1, 1, 1)

    def patch_sq_norm_backward(self, grad_q: Tensor, x: Tensor, grad_x: Tensor) -> None:
        grad_x.addcmul_(x, grad_q.view(-1, 1).to(x.dtype), value=2)


@functools.lru_cache(maxsize=None)
def geometry_from_spec(spec: Tuple[int, ...]):
    """The geometry whose `spec` this is (cached: the custom ops rebuild it at every call)."""
    if not spec:
        return LinearGeometry()
    return ConvGeometry(spec[0:2], spec[2:4], spec[4:6], spec[6:8], spec[8])
