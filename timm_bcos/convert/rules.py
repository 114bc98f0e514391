"""The module rules of the converter (pass 2, paper §3.3): which leaf module becomes what.

conv -> `BcosConv2d`, CondConv -> `BcosCondConv2d`, linear -> `BcosLinear`, norms removed
(``norm='none'``, the paper) or made bias-free and uncentered (``norm='bnu'``, v2), activations
removed (or kept as a `DynamicGate` where they make a gate), max-pools -> average pools, linear
modules kept. `MODULE_RULES` is the table; `ConversionContext` carries the settings of one
conversion.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from ..layers import (ActivationGate, AddInverse, BatchNormUncentered2d, BcosCondConv2d, BcosConv2d, BcosConv2dSame,
                      BcosLinear, DetachableModule, DynamicGate, GroupNormUncentered, InputShift, LayerNorm2dUncentered,
                      LayerNormUncentered, LogitLayer)
from .tracing import TraceCache

__all__ = ['ConversionContext', 'LINEAR_UPSAMPLE_MODES', 'MODULE_RULES', 'ModuleRule', 'SUPPORTED_SUMMARY',
           'TIMM_ACTIVATION_MODULES', 'TRUSTED_FORWARDS', 'UnsupportedModuleError', 'find_rule', 'is_activation',
           'is_linear_leaf', 'is_norm', 'keep_activation', 'pair', 'timm_classes']


class UnsupportedModuleError(TypeError):
    """A module or operation whose conversion could not keep the model dynamic-linear."""

    def __init__(self, path: str, what: str, reason: str) -> None:
        self.path, self.what, self.reason = path, what, reason
        super().__init__(
            f'cannot convert {what} at {path or "<root>"!r} to B-cos: {reason}. '
            f'Supported: {SUPPORTED_SUMMARY}. Use strict=False to leave it unconverted (the model is '
            f'then not exactly W(x) x + b).')


# --- module classes -------------------------------------------------------------------------

_TIMM_LAYER_MODULES = ('timm.layers', 'timm.layers.pool2d_same', 'timm.layers.adaptive_avgmax_pool',
                       'timm.layers.conv2d_same')


def timm_classes(*names: str) -> Tuple[type, ...]:
    """timm layer classes by name (absent ones are skipped: timm versions differ)."""
    modules = [importlib.import_module(m) for m in _TIMM_LAYER_MODULES]
    found = {n: getattr(m, n) for m in reversed(modules) for n in names if hasattr(m, n)}
    return tuple(found[n] for n in names if n in found)


_TORCH_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold,
)
TIMM_ACTIVATION_MODULES = ('timm.layers.activations', 'timm.layers.activations_me')
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_TIMM_NORM_MODULES = ('timm.layers.norm', 'timm.layers.norm_act', 'timm.layers.evo_norm',
                      'timm.layers.filter_response_norm', 'timm.layers.inplace_abn')
_LINEAR_LEAVES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten,
    nn.Unflatten, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d, nn.PixelShuffle,
    nn.PixelUnshuffle, nn.ChannelShuffle, nn.Unfold, nn.Fold,
)
LINEAR_UPSAMPLE_MODES = ('nearest', 'nearest-exact', 'linear', 'bilinear', 'bicubic', 'trilinear', 'area')


def is_activation(m: nn.Module) -> bool:
    return isinstance(m, _TORCH_ACTIVATIONS) or type(m).__module__ in TIMM_ACTIVATION_MODULES


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, _TORCH_NORMS) or type(m).__module__ in _TIMM_NORM_MODULES


def is_linear_leaf(m: nn.Module) -> bool:
    if isinstance(m, nn.Upsample):
        return m.mode in LINEAR_UPSAMPLE_MODES
    if isinstance(m, nn.ConstantPad2d):
        return m.value == 0
    timm_linear = timm_classes('DropPath', 'AvgPool2dSame', 'FastAdaptiveAvgPool', 'DropBlock2d')
    return isinstance(m, _LINEAR_LEAVES + timm_linear)


# --- conversion context and module rules ------------------------------------------------------

@dataclass
class ConversionContext:
    """The settings of one conversion, what the fx pass found (module paths that compute a gate, kept
    as `DynamicGate`; modules that only feed a gate, exempt from the rules) and the journal of every
    change made to the model, so that a failed conversion leaves it as it was (`undo`).

    B-cosification (`timm_bcos.bcosify`) uses the same rules with the pretrained weights copied
    (`copy_weights`, unnormalised: ``normalized=False``), and optionally the biases, activations
    (as `ActivationGate`s), max-pools and norms (``norm='keep'``) kept.
    """

    b: float
    max_out: int
    norm: str
    strict: bool
    scale: Optional[str]
    gate_rule: str = 'nonlinear'
    copy_weights: bool = False
    normalized: bool = True
    keep_biases: bool = False
    activations: str = 'remove'
    max_pool: str = 'avg'
    gates: Set[str] = field(default_factory=set)
    traces: TraceCache = field(default_factory=lambda: TraceCache(lambda m: find_rule(m) is None))
    exempt: Set[str] = field(default_factory=set)
    journal: List[Tuple[Any, str, bool, Any]] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # strict=False: what was left unconverted, and why
    root: Optional[nn.Module] = None  # the model, and an input of it: examples for `trace_concrete`
    example_input: Optional[torch.Tensor] = None
    _examples: Optional[Dict[str, Any]] = None

    @classmethod
    def create(cls, b: float, max_out: int, norm: str, strict: bool = True,
               gate_rule: str = 'nonlinear') -> 'ConversionContext':
        """The paper's design has no norms, so its layers need v1's output scale to train
        (``scale='auto'``); with uncentered norms (v2) the layers are unscaled."""
        return cls(b=b, max_out=max_out, norm=norm, strict=strict, scale='auto' if norm == 'none' else None,
                   gate_rule=gate_rule)

    def example(self, path: str, method: str) -> Optional[Any]:
        """The inputs of the module at `path` in one forward of the model (`record_examples`, run
        once, on first need), for a forward fx cannot trace symbolically; None if unknown."""
        if self.root is None or self.example_input is None:
            return None
        if method != 'forward':
            return ((self.example_input,), {}) if not path and method == 'forward_features' else None
        if self._examples is None:
            from .concrete_trace import record_examples
            try:
                self._examples = record_examples(self.root, self.example_input)
            except Exception:  # the partly converted model does not run: no examples
                self._examples = {}
        return self._examples.get(path)

    def ran_without(self, path: str) -> bool:
        """Whether the recorded forward of the model ran and did not call the module at `path`."""
        return bool(self._examples) and path not in self._examples

    def set(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, journaled for `undo` (the converter changes models only so)."""
        own = obj.__dict__ if name in obj.__dict__ else getattr(obj, '_modules', {})
        had = name in own
        self.journal.append((obj, name, had, own[name] if had else None))
        setattr(obj, name, value)

    def undo(self) -> None:
        """Restore every attribute set through `set`, latest first: the model as before the conversion."""
        for obj, name, had, old in reversed(self.journal):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self.journal.clear()

    def unsupported(self, path: str, what: str, reason: str) -> None:
        err = UnsupportedModuleError(path, what, reason)
        if self.strict:
            raise err
        found = f'{what} at {path or "<root>"!r}: {reason}'
        if found not in self.skipped:  # the fx pass traces train and eval mode: report each once
            self.skipped.append(found)
            warnings.warn(str(err), stacklevel=3)

    def bcos_kwargs(self) -> Dict[str, Any]:
        unnormalised = {} if self.normalized else {'normalized': False}  # B-cosification
        return dict(b=self.b, max_out=self.max_out, scale=self.scale, **unnormalised)


def effective_weight(m: nn.Module) -> torch.Tensor:
    """The weight a conv applies: timm's weight-standardised convs (NF-nets' ``StdConv2d``,
    ``ScaledStdConv2d`` and their 'Same' forms) standardise theirs per output in the forward."""
    if type(m).__name__ not in ('StdConv2d', 'StdConv2dSame', 'ScaledStdConv2d', 'ScaledStdConv2dSame'):
        return m.weight
    gain = (m.gain * m.scale).view(-1) if getattr(m, 'gain', None) is not None else None
    return torch.nn.functional.batch_norm(m.weight.reshape(1, m.out_channels, -1), None, None, weight=gain,
                                          training=True, momentum=0., eps=m.eps).reshape_as(m.weight)


def _copy_weights(src: nn.Module, dst: nn.Module, ctx: ConversionContext) -> nn.Module:
    """B-cosification: the pretrained weight (and bias, where kept) into the new B-cos layer."""
    if ctx.copy_weights:
        with torch.no_grad():
            dst.weight.copy_(effective_weight(src))
            if getattr(dst, 'bias', None) is not None:
                dst.bias.copy_(src.bias)
    return dst


def _convert_conv(m: nn.Conv2d, ctx: ConversionContext, path: str) -> nn.Module:
    conv_same = timm_classes('Conv2dSame', 'Conv2dSameExport')
    kwargs = dict(stride=m.stride, dilation=m.dilation, groups=m.groups, **ctx.bcos_kwargs())
    if ctx.keep_biases and m.bias is not None:
        kwargs['bias'] = True
    if isinstance(m, conv_same) or getattr(m, 'same_pad', False):  # incl. timm's StdConv2dSame
        new = BcosConv2dSame(m.in_channels, m.out_channels, m.kernel_size, **kwargs)
    else:
        new = BcosConv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding,
                         padding_mode=m.padding_mode, **kwargs)
    return _copy_weights(m, new.to(device=m.weight.device, dtype=m.weight.dtype), ctx)


def _convert_cond_conv(m: nn.Module, ctx: ConversionContext, path: str) -> nn.Module:
    """timm's `CondConv2d` (per-sample mixture of expert kernels) -> `BcosCondConv2d`."""
    if ctx.copy_weights:
        ctx.unsupported(path, type(m).__name__, 'B-cosifying CondConv expert weights is not supported')
        return m
    dynamic = m.dynamic_padding
    new = BcosCondConv2d(m.in_channels, m.out_channels, m.kernel_size, num_experts=m.num_experts,
                         same_padding=dynamic, stride=m.stride, padding=0 if dynamic else m.padding,
                         dilation=m.dilation, groups=m.groups, **ctx.bcos_kwargs())
    return new.to(device=m.weight.device, dtype=m.weight.dtype)


def _convert_linear(m: nn.Linear, ctx: ConversionContext, path: str) -> nn.Module:
    new = BcosLinear(m.in_features, m.out_features, bias=ctx.keep_biases and m.bias is not None, **ctx.bcos_kwargs())
    return _copy_weights(m, new.to(device=m.weight.device, dtype=m.weight.dtype), ctx)


def _convert_norm(m: nn.Module, ctx: ConversionContext, path: str) -> nn.Module:
    """The norm (removed, or uncentered), then the activation of a timm norm+act module."""
    if ctx.norm == 'keep':
        return m
    new = nn.Identity() if ctx.norm == 'none' else _uncentered_norm(m, ctx, path)
    act = getattr(m, 'act', None)
    if ctx.activations == 'keep' and isinstance(act, nn.Module) and is_activation(act):
        return nn.Sequential(new, _convert_activation(act, ctx, f'{path}.act'))
    return new


def _uncentered_norm(m: nn.Module, ctx: ConversionContext, path: str) -> nn.Module:
    layer_norm_2d = timm_classes('LayerNorm2d', 'LayerNormAct2d', 'LayerNorm2dFp32', 'LayerNormAct2dFp32')
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__.startswith('FrozenBatchNorm'):
        new = BatchNormUncentered2d(m.num_features, eps=m.eps)
    elif isinstance(m, nn.GroupNorm):
        new = GroupNormUncentered(m.num_groups, m.num_channels, eps=m.eps)
    elif isinstance(m, layer_norm_2d):
        new = LayerNorm2dUncentered(m.normalized_shape[0], eps=m.eps)
    elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        new = LayerNormUncentered(m.normalized_shape[0], eps=m.eps, affine=m.weight is not None)
    else:
        ctx.unsupported(path, type(m).__name__, "norm='bnu' has uncentered versions of BatchNorm, "
                                                 "GroupNorm, LayerNorm2d and LayerNorm (last dimension) only")
        return m
    weight = getattr(m, 'weight', None)
    if weight is None:
        return new
    new = new.to(device=weight.device, dtype=weight.dtype)
    if ctx.copy_weights:  # B-cosification: the pretrained scale (and BatchNorm's running variance)
        with torch.no_grad():
            new.weight.copy_(weight)
            if getattr(new, 'running_var', None) is not None and getattr(m, 'running_var', None) is not None:
                new.running_var.copy_(m.running_var)
    return new


def _convert_activation(m: nn.Module, ctx: ConversionContext, path: str) -> nn.Module:
    if path in ctx.gates:
        return DynamicGate(m)
    if ctx.activations == 'keep':
        return keep_activation(m, ctx, path) or m
    return nn.Identity()


def keep_activation(act: Callable, ctx: ConversionContext, path: str) -> Optional[nn.Module]:
    """An activation kept as ``x * g(x)`` (`ActivationGate`); one with ``act(0) != 0`` has no such
    form (refused: None)."""
    probe = torch.zeros(1)
    try:
        at_zero = float(act(probe))
    except Exception:  # e.g. an activation that needs a 4-D input: it is probed by the checks
        at_zero = 0.0
    if at_zero != 0.0:
        ctx.unsupported(path, getattr(act, '__name__', type(act).__name__),
                        f'a kept activation must be 0 at 0 to be a gate x * g(x) (it is {at_zero:g})')
        return None
    return ActivationGate(act)


def _convert_max_pool(m: nn.Module, ctx: ConversionContext, path: str) -> nn.Module:
    if ctx.max_pool == 'keep':
        return m  # a max-pool selects one input: dynamic linear as it is
    max_pool_same, = timm_classes('MaxPool2dSame')
    if any(d != 1 for d in pair(m.dilation)):
        ctx.unsupported(path, type(m).__name__, 'a dilated max-pool has no average-pool equivalent')
        return m
    if isinstance(m, max_pool_same):
        from timm.layers import AvgPool2dSame
        return AvgPool2dSame(m.kernel_size, m.stride, ceil_mode=m.ceil_mode)
    return nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)


def _convert_adaptive_max_pool(m: nn.Module, ctx: ConversionContext, path: str) -> nn.Module:
    if ctx.max_pool == 'keep':
        return m
    fast = timm_classes('FastAdaptiveMaxPool', 'FastAdaptiveAvgMaxPool')
    if isinstance(m, fast):
        fast_avg, = timm_classes('FastAdaptiveAvgPool')
        new = fast_avg(flatten=m.flatten)
        new.dim = m.dim
        return new
    return nn.AdaptiveAvgPool2d(m.output_size)


def _unsupported_pool(m: nn.Module, ctx: ConversionContext, path: str) -> nn.Module:
    ctx.unsupported(path, type(m).__name__, 'concatenated average+max pooling changes the feature width; '
                                            "build the model with global_pool='avg'")
    return m


def _unsupported_recurrent(m: nn.Module, ctx: ConversionContext, path: str) -> nn.Module:
    ctx.unsupported(path, type(m).__name__, 'a recurrent layer multiplies input-dependent gates and states: it '
                                            'has no dynamic-linear form')
    return m


def _keep(m: nn.Module, ctx: ConversionContext, path: str) -> nn.Module:
    return m


def pair(v) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@dataclass(frozen=True)
class ModuleRule:
    """One line of the conversion table: modules matching `match` are replaced by `convert`.

    `weight_args`: positions (after the input) of forward arguments that set the module's weights
    per sample (CondConv's routing). The fx pass treats them like gates: their squashing activation
    is kept as a `DynamicGate`, and the converted module detaches them in explanation mode.
    """
    name: str
    match: Callable[[nn.Module], bool]
    convert: Callable[[nn.Module, ConversionContext, str], nn.Module]
    weight_args: Tuple[int, ...] = ()


MODULE_RULES: List[ModuleRule] = [
    ModuleRule('B-cos / explanation-aware module (kept)',
               lambda m: isinstance(m, (DetachableModule, LogitLayer, AddInverse, InputShift)), _keep),
    ModuleRule('Conv2d (incl. Conv2dSame, grouped, dilated) -> BcosConv2d',
               lambda m: isinstance(m, nn.Conv2d), _convert_conv),
    ModuleRule('CondConv2d -> BcosCondConv2d (routing detached when explaining)',
               lambda m: isinstance(m, timm_classes('CondConv2d')), _convert_cond_conv, weight_args=(0,)),
    ModuleRule('Linear -> BcosLinear', lambda m: isinstance(m, nn.Linear), _convert_linear),
    ModuleRule("norms (incl. norm+act) -> removed, or bias-free uncentered with norm='bnu'", is_norm, _convert_norm),
    ModuleRule('activation -> removed (a gate -> DynamicGate)', is_activation, _convert_activation),
    ModuleRule('MaxPool2d (incl. MaxPool2dSame) -> AvgPool2d',
               lambda m: isinstance(m, nn.MaxPool2d), _convert_max_pool),
    ModuleRule('adaptive max / avg-max pool -> adaptive avg pool',
               lambda m: isinstance(m, (nn.AdaptiveMaxPool2d,) + timm_classes(
                   'FastAdaptiveMaxPool', 'FastAdaptiveAvgMaxPool', 'AdaptiveAvgMaxPool2d')),
               _convert_adaptive_max_pool),
    ModuleRule('concatenated avg+max pool (unsupported)',
               lambda m: isinstance(m, timm_classes('FastAdaptiveCatAvgMaxPool', 'AdaptiveCatAvgMaxPool2d')),
               _unsupported_pool),
    ModuleRule('recurrent layer (LSTM, GRU, RNN) (unsupported)', lambda m: isinstance(m, nn.RNNBase),
               _unsupported_recurrent),
    ModuleRule('linear module (identity, dropout, drop-path, avg-pool, flatten, upsample, zero-pad) kept',
               is_linear_leaf, _keep),
]

SUPPORTED_SUMMARY = '; '.join(r.name for r in MODULE_RULES) + (
    '; inline residual adds, concatenation, reshapes, mean/sum, average pools, fixed (non-learned) '
    'filters, products with parameters or constants (layer scale), gated products x * g(...) with g a '
    'squashing activation or a ratio (squeeze-excite, GRN) or the one side with an activation or a norm '
    '(GLU-style, gMLP, FocalNet); attention (softmax(q k^T) v, scaled_dot_product_attention: q, k and the '
    'mask detached when explaining); positional embeddings and tokens (stored (1, ...) tensors added or '
    'concatenated: explained constants); maxima over a dimension (kept); inline activations (incl. powers) '
    'and biases (other constants added) are removed')


# Modules whose forward torch.fx cannot trace (control flow on shapes, list inputs). Each forward was
# read: besides calls to its children, which the rules convert, it uses only linear operations.
TRUSTED_FORWARDS: Dict[str, str] = {
    'timm.models.vgg.ConvMlp': 'adaptive average pooling to at least 7x7 before its convolutions',
    'timm.models.hrnet.HighResolutionModule': 'branches and sums of fuse layers (convs, nearest upsampling)',
}


def find_rule(m: nn.Module) -> Optional[ModuleRule]:
    return next((r for r in MODULE_RULES if r.match(m)), None)
