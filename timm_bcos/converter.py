"""Convert any timm CNN (or a user's own) into a B-cos network by rewriting its graph (paper §3.3).

Two passes, both driven by the rule tables below:

1. Every custom module's own ``forward`` is traced with torch.fx, its direct submodules kept as
   leaves, and every inline operation is classified: linear (residual adds, ``torch.cat``,
   reshapes, average pools, layer-scale products) stays; functional activations are removed;
   functional max-pools become average pools; a product of two input-dependent tensors whose
   one side ends in an activation is a *gate* and becomes a `DynamicGate` (detached in
   explanation mode, so ``x * g(x)`` is part of ``W(x) x``). Anything else cannot be shown to
   keep dynamic linearity and raises `UnsupportedModuleError` (or warns, ``strict=False``).
2. Leaf modules are swapped by `MODULE_RULES`: conv -> `BcosConv2d`, linear -> `BcosLinear`,
   norms removed (``norm='none'``, the paper) or made bias-free and uncentered (``norm='bnu'``,
   v2), activations removed, max-pools -> average pools. The classifier gets the logit bias of
   Eq. 16 and the stem the 6-channel [x, 1-x] input.
"""
from __future__ import annotations

import math
import operator
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layers import (AddInverse, BcosClassifier, BcosConv2d, BcosConvClassifier, BcosLinear, DetachableModule,
                     LogitLayer)
from .layers.bcos_conv import BcosConv2dSame
from .layers.gate import DynamicGate
from .mixin import attach_bcos_mixin

__all__ = ['convert_to_bcos', 'unconverted_modules', 'UnsupportedModuleError', 'MODULE_RULES', 'TRUSTED_FORWARDS']


class UnsupportedModuleError(TypeError):
    """A module or operation whose conversion could not keep the model dynamic-linear."""

    def __init__(self, path: str, what: str, reason: str) -> None:
        self.path, self.what, self.reason = path, what, reason
        super().__init__(
            f'cannot convert {what} at {path or "<root>"!r} to B-cos: {reason}. '
            f'Supported: {_SUPPORTED_SUMMARY}. Use strict=False to leave it unconverted (the model is '
            f'then not exactly W(x) x + b).')


# --- module classes -------------------------------------------------------------------------

_TIMM_LAYER_MODULES = ('timm.layers', 'timm.layers.pool2d_same', 'timm.layers.adaptive_avgmax_pool',
                       'timm.layers.conv2d_same')


def _timm_classes(*names: str) -> Tuple[type, ...]:
    """timm layer classes by name (absent ones are skipped: timm versions differ)."""
    import importlib
    modules = [importlib.import_module(m) for m in _TIMM_LAYER_MODULES]
    found = {n: getattr(m, n) for m in reversed(modules) for n in names if hasattr(m, n)}
    return tuple(found[n] for n in names if n in found)


_TORCH_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold,
)
_TIMM_ACTIVATION_MODULES = ('timm.layers.activations', 'timm.layers.activations_me')
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_TIMM_NORM_MODULES = ('timm.layers.norm', 'timm.layers.norm_act', 'timm.layers.evo_norm',
                      'timm.layers.filter_response_norm', 'timm.layers.inplace_abn')
_LINEAR_LEAVES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten,
    nn.Unflatten, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d, nn.PixelShuffle,
    nn.PixelUnshuffle, nn.ChannelShuffle,
)
_LINEAR_UPSAMPLE_MODES = ('nearest', 'nearest-exact', 'linear', 'bilinear', 'bicubic', 'trilinear', 'area')


def _is_activation(m: nn.Module) -> bool:
    return isinstance(m, _TORCH_ACTIVATIONS) or type(m).__module__ in _TIMM_ACTIVATION_MODULES


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, _TORCH_NORMS) or type(m).__module__ in _TIMM_NORM_MODULES


def _is_linear_leaf(m: nn.Module) -> bool:
    if isinstance(m, nn.Upsample):
        return m.mode in _LINEAR_UPSAMPLE_MODES
    if isinstance(m, nn.ConstantPad2d):
        return m.value == 0
    timm_linear = _timm_classes('DropPath', 'AvgPool2dSame', 'FastAdaptiveAvgPool', 'DropBlock2d')
    return isinstance(m, _LINEAR_LEAVES + timm_linear)


# --- conversion context and module rules ------------------------------------------------------

@dataclass
class _Context:
    b: float
    max_out: int
    norm: str
    strict: bool
    scale: Optional[str]
    gates: Set[str] = field(default_factory=set)
    exempt: Set[str] = field(default_factory=set)

    def unsupported(self, path: str, what: str, reason: str) -> None:
        err = UnsupportedModuleError(path, what, reason)
        if self.strict:
            raise err
        warnings.warn(str(err), stacklevel=3)

    def bcos_kwargs(self) -> Dict[str, Any]:
        return dict(b=self.b, max_out=self.max_out, scale=self.scale)


def _convert_conv(m: nn.Conv2d, ctx: _Context, path: str) -> nn.Module:
    conv_same = _timm_classes('Conv2dSame', 'Conv2dSameExport')
    kwargs = dict(stride=m.stride, dilation=m.dilation, groups=m.groups, **ctx.bcos_kwargs())
    if isinstance(m, conv_same):
        new = BcosConv2dSame(m.in_channels, m.out_channels, m.kernel_size, **kwargs)
    else:
        new = BcosConv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding,
                         padding_mode=m.padding_mode, **kwargs)
    return new.to(device=m.weight.device, dtype=m.weight.dtype)


def _convert_linear(m: nn.Linear, ctx: _Context, path: str) -> nn.Module:
    return BcosLinear(m.in_features, m.out_features, **ctx.bcos_kwargs()).to(
        device=m.weight.device, dtype=m.weight.dtype)


def _convert_norm(m: nn.Module, ctx: _Context, path: str) -> nn.Module:
    if ctx.norm == 'none':
        return nn.Identity()
    from .layers.norm import BatchNormUncentered2d, GroupNormUncentered, LayerNorm2dUncentered
    layer_norm_2d = _timm_classes('LayerNorm2d', 'LayerNormAct2d', 'LayerNorm2dFp32', 'LayerNormAct2dFp32')
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__.startswith('FrozenBatchNorm'):
        new = BatchNormUncentered2d(m.num_features, eps=m.eps)
    elif isinstance(m, nn.GroupNorm):
        new = GroupNormUncentered(m.num_groups, m.num_channels, eps=m.eps)
    elif isinstance(m, layer_norm_2d):
        new = LayerNorm2dUncentered(m.normalized_shape[0], eps=m.eps)
    else:
        ctx.unsupported(path, type(m).__name__, "norm='bnu' has uncentered versions of BatchNorm, "
                                                 "GroupNorm and LayerNorm2d only")
        return m
    weight = getattr(m, 'weight', None)
    return new.to(device=weight.device, dtype=weight.dtype) if weight is not None else new


def _convert_activation(m: nn.Module, ctx: _Context, path: str) -> nn.Module:
    return DynamicGate(m) if path in ctx.gates else nn.Identity()


def _convert_max_pool(m: nn.Module, ctx: _Context, path: str) -> nn.Module:
    max_pool_same, = _timm_classes('MaxPool2dSame')
    if any(d != 1 for d in _pair(m.dilation)):
        ctx.unsupported(path, type(m).__name__, 'a dilated max-pool has no average-pool equivalent')
        return m
    if isinstance(m, max_pool_same):
        from timm.layers import AvgPool2dSame
        return AvgPool2dSame(m.kernel_size, m.stride, ceil_mode=m.ceil_mode)
    return nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)


def _convert_adaptive_max_pool(m: nn.Module, ctx: _Context, path: str) -> nn.Module:
    fast = _timm_classes('FastAdaptiveMaxPool', 'FastAdaptiveAvgMaxPool')
    if isinstance(m, fast):
        fast_avg, = _timm_classes('FastAdaptiveAvgPool')
        new = fast_avg(flatten=m.flatten)
        new.dim = m.dim
        return new
    return nn.AdaptiveAvgPool2d(m.output_size)


def _unsupported_pool(m: nn.Module, ctx: _Context, path: str) -> nn.Module:
    ctx.unsupported(path, type(m).__name__, 'concatenated average+max pooling changes the feature width; '
                                            "build the model with global_pool='avg'")
    return m


def _keep(m: nn.Module, ctx: _Context, path: str) -> nn.Module:
    return m


def _pair(v) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@dataclass(frozen=True)
class ModuleRule:
    """One line of the conversion table: modules matching `match` are replaced by `convert`."""
    name: str
    match: Callable[[nn.Module], bool]
    convert: Callable[[nn.Module, _Context, str], nn.Module]


MODULE_RULES: List[ModuleRule] = [
    ModuleRule('B-cos / explanation-aware module (kept)',
               lambda m: isinstance(m, (DetachableModule, LogitLayer, AddInverse)), _keep),
    ModuleRule('Conv2d (incl. Conv2dSame, grouped, dilated) -> BcosConv2d',
               lambda m: isinstance(m, nn.Conv2d), _convert_conv),
    ModuleRule('Linear -> BcosLinear', lambda m: isinstance(m, nn.Linear), _convert_linear),
    ModuleRule("norms (incl. norm+act) -> removed, or bias-free uncentered with norm='bnu'", _is_norm, _convert_norm),
    ModuleRule('activation -> removed (a gate -> DynamicGate)', _is_activation, _convert_activation),
    ModuleRule('MaxPool2d (incl. MaxPool2dSame) -> AvgPool2d',
               lambda m: isinstance(m, nn.MaxPool2d), _convert_max_pool),
    ModuleRule('adaptive max / avg-max pool -> adaptive avg pool',
               lambda m: isinstance(m, (nn.AdaptiveMaxPool2d,) + _timm_classes(
                   'FastAdaptiveMaxPool', 'FastAdaptiveAvgMaxPool', 'AdaptiveAvgMaxPool2d')),
               _convert_adaptive_max_pool),
    ModuleRule('concatenated avg+max pool (unsupported)',
               lambda m: isinstance(m, _timm_classes('FastAdaptiveCatAvgMaxPool', 'AdaptiveCatAvgMaxPool2d')),
               _unsupported_pool),
    ModuleRule('linear module (identity, dropout, drop-path, avg-pool, flatten, upsample, zero-pad) kept',
               _is_linear_leaf, _keep),
]

_SUPPORTED_SUMMARY = '; '.join(r.name for r in MODULE_RULES) + (
    '; inline residual adds, concatenation, reshapes, mean/sum, average pools, products with '
    'parameters or constants (layer scale), gated products x * act(...) (squeeze-excite)')


# Modules whose forward torch.fx cannot trace (control flow on shapes, list inputs). Each forward was
# read: besides calls to its children, which the rules convert, it uses only linear operations.
TRUSTED_FORWARDS: Dict[str, str] = {
    'timm.models.vgg.ConvMlp': 'adaptive average pooling to at least 7x7 before its convolutions',
    'timm.models.hrnet.HighResolutionModule': 'branches and sums of fuse layers (convs, nearest upsampling)',
}


def _find_rule(m: nn.Module) -> Optional[ModuleRule]:
    return next((r for r in MODULE_RULES if r.match(m)), None)


# --- fx analysis of inline operations ---------------------------------------------------------

def _timm_functions(*names: str) -> Tuple[Callable, ...]:
    import timm.layers.activations as act
    import timm.layers.activations_me as act_me
    return tuple(getattr(mod, n) for mod in (act, act_me) for n in names if hasattr(mod, n))


_ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.elu, F.elu_, F.leaky_relu, F.leaky_relu_, F.selu, F.celu, F.softplus,
    F.sigmoid, torch.sigmoid, torch.tanh, F.tanh, torch.clamp, torch.clamp_min, torch.clip, F.softmax,
    torch.softmax,
}
_ACTIVATION_METHODS = {'relu', 'relu_', 'sigmoid', 'sigmoid_', 'tanh', 'tanh_', 'clamp', 'clamp_', 'clamp_min',
                       'clamp_min_', 'clip', 'clip_', 'softmax'}
_TIMM_ACTIVATION_FUNCTIONS = (
    'swish', 'mish', 'sigmoid', 'tanh', 'hard_swish', 'hard_sigmoid', 'hard_mish', 'gelu', 'gelu_tanh',
    'quick_gelu', 'swish_me', 'mish_me', 'hard_sigmoid_me', 'hard_swish_me', 'hard_mish_me')
# Squashing activations that make a product a gate (a ReLU or SiLU on one side does not).
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax, torch.softmax, torch.tanh, F.tanh}
_GATE_METHODS = {'sigmoid', 'sigmoid_', 'softmax', 'tanh', 'tanh_'}
_TIMM_GATES = ('sigmoid', 'hard_sigmoid', 'hard_sigmoid_me', 'tanh')
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Tanh)
_MAX_POOLS = {F.max_pool1d: F.avg_pool1d, F.max_pool2d: F.avg_pool2d, torch.max_pool2d: F.avg_pool2d,
              F.adaptive_max_pool2d: F.adaptive_avg_pool2d, F.adaptive_max_pool1d: F.adaptive_avg_pool1d}
_LINEAR_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.neg, operator.pos, operator.getitem,
    torch.add, torch.sub, torch.neg, torch.cat, torch.concat, torch.stack, torch.split, torch.chunk,
    torch.unbind, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, torch.narrow, torch.roll, torch.flip, torch.mean, torch.sum, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle,
    F.interpolate, F.pad, torch.movedim,
}
_PRODUCTS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div,
             operator.matmul, torch.matmul, torch.einsum, torch.bmm}
_LINEAR_METHODS = {
    'view', 'reshape', 'flatten', 'unflatten', 'permute', 'transpose', 'contiguous', 'unsqueeze', 'squeeze',
    'expand', 'expand_as', 'repeat', 'narrow', 'split', 'chunk', 'unbind', 'mean', 'sum', 'add', 'add_',
    'sub', 'sub_', 'neg', 'to', 'type_as', 'float', 'double', 'half', 'bfloat16', 'clone', 'roll', 'flip',
    'view_as', 'reshape_as', 'movedim', '__getitem__',
}
_PRODUCT_METHODS = {'mul', 'mul_', 'div', 'div_', 'matmul'}
_STATIC_METHODS = {'size', 'dim', 'numel', 'ndimension'}
_SHAPE_ONLY = {'view', 'reshape', 'flatten', 'unflatten', 'expand', 'expand_as', 'unsqueeze', 'squeeze',
               'permute', 'transpose', 'contiguous', 'view_as', 'reshape_as', 'to', 'type_as'}


class _Tracer(fx.Tracer):
    """Trace one module's own forward: every submodule is a leaf (converted by the module rules)."""

    def __init__(self, root: nn.Module) -> None:
        from timm.layers import get_notrace_functions
        autowrap = tuple(f for f in get_notrace_functions() if callable(f)) + _timm_functions(
            *_TIMM_ACTIVATION_FUNCTIONS)
        super().__init__(autowrap_functions=autowrap)
        self._root = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self._root


def _node_label(node: fx.Node) -> str:
    target = getattr(node.target, '__name__', node.target)
    return f'{node.op} {target!s} (fx node {node.name!r})'


@dataclass
class _Plan:
    """The rewrite of one module's forward: nodes to drop, pools to swap, functional gates."""
    drop: List[fx.Node] = field(default_factory=list)
    pools: List[fx.Node] = field(default_factory=list)
    gate_functions: List[fx.Node] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.drop or self.pools or self.gate_functions)


class _GraphAnalysis:
    """Classify every node of a traced forward; collect gates and the rewrites it needs.

    Gates are found first: in a product of two input-dependent tensors, the side that comes
    (through reshapes) from a squashing activation -- sigmoid, hard-sigmoid, softmax, tanh, or a
    module whose output does -- is the gate. Nodes that only feed gates are exempt from the
    linearity checks: their value is detached in explanation mode.
    """

    def __init__(self, module: nn.Module, graph: fx.Graph, static_inputs: Set[str], path: str,
                 ctx: _Context) -> None:
        self.module, self.graph, self.path, self.ctx = module, graph, path, ctx
        self.static_inputs = static_inputs
        self.dynamic: Dict[fx.Node, bool] = {}
        self.plan = _Plan()
        self.gate_modules: Set[str] = set()
        self.gate_internal_modules: Set[str] = set()

    def run(self) -> None:
        for node in self.graph.nodes:
            self.dynamic[node] = self._is_dynamic(node)
        gates: Set[fx.Node] = set()
        gated: Set[fx.Node] = set()  # the products x * g
        for node in self.graph.nodes:
            if self._is_product(node) and len(self._dynamic_args(node)) == 2 and not self._divides(node):
                gate = self._find_gate(node)
                if gate is not None:
                    gates.add(gate)
                    gated.add(node)
        internal = self._gate_internal(gates)
        for node in self.graph.nodes:
            if node in gated:
                continue
            if node in gates:
                if node.op == 'call_module':
                    self.gate_modules.add(node.target)
                else:
                    self.plan.gate_functions.append(node)
            elif node.op == 'call_module' and node in internal:
                self.gate_internal_modules.add(node.target)
            elif node.op in ('call_function', 'call_method') and self.dynamic[node]:
                self._check(node, lenient=node in internal)

    def _is_dynamic(self, node: fx.Node) -> bool:
        if node.op == 'placeholder':  # the inputs, except specialised flags (fx names them pre_logits_1)
            return node.target.rstrip('_0123456789') not in self.static_inputs
        if node.op in ('get_attr', 'output'):
            return node.op == 'output'
        if node.op == 'call_method' and node.target in _STATIC_METHODS:
            return False
        if node.op == 'call_function' and node.target is getattr:
            return False
        return any(self.dynamic.get(a, False) for a in _flat_nodes((node.args, node.kwargs)))

    def _dynamic_args(self, node: fx.Node) -> List[fx.Node]:
        return [a for a in _flat_nodes((node.args, node.kwargs)) if self.dynamic.get(a, False)]

    @staticmethod
    def _is_product(node: fx.Node) -> bool:
        return (node.op == 'call_method' and node.target in _PRODUCT_METHODS) or (
            node.op == 'call_function' and node.target in _PRODUCTS)

    @staticmethod
    def _divides(node: fx.Node) -> bool:
        return node.target in (operator.truediv, operator.itruediv, torch.div, 'div', 'div_')

    def _find_gate(self, node: fx.Node) -> Optional[fx.Node]:
        sources = [self._gate_source(a) for a in self._dynamic_args(node)]
        found = [g for g in sources if g is not None]
        return found[0] if len(found) == 1 else None

    def _gate_source(self, node: fx.Node) -> Optional[fx.Node]:
        """The squashing activation a product operand comes from, through reshapes; None if none."""
        while node.op == 'call_method' and node.target in _SHAPE_ONLY:
            node = node.args[0]
        if node.op == 'call_module':
            return node if _is_gate_module(self.module.get_submodule(node.target)) else None
        if node.op == 'call_method':
            return node if node.target in _GATE_METHODS else None
        if node.op == 'call_function':
            return node if node.target in _GATE_FUNCTIONS or node.target in _timm_functions(*_TIMM_GATES) else None
        return None

    def _gate_internal(self, gates: Set[fx.Node]) -> Set[fx.Node]:
        """Nodes whose every use leads only into gates (computed in reverse order)."""
        internal: Set[fx.Node] = set()
        for node in reversed(list(self.graph.nodes)):
            if node in gates or node.op in ('placeholder', 'output'):
                continue
            users = list(node.users)
            if users and all(u in gates or u in internal for u in users):
                internal.add(node)
        return internal

    def _check(self, node: fx.Node, lenient: bool) -> None:
        """Rewrite activations and max-pools; check the rest is linear (not on a gate's path)."""
        target, method = node.target, node.op == 'call_method'
        if (method and target in _ACTIVATION_METHODS) or (not method and (
                target in _ACTIVATION_FUNCTIONS or target in _timm_functions(*_TIMM_ACTIVATION_FUNCTIONS))):
            self.plan.drop.append(node)
        elif not method and target in _MAX_POOLS:
            self.plan.pools.append(node)
        elif lenient:
            return  # only feeds a gate, whose value is detached in explanation mode
        elif self._is_product(node):
            self._check_product(node)
        elif (method and target in _LINEAR_METHODS) or (not method and target in _LINEAR_FUNCTIONS):
            self._check_linear(node)
        else:
            self.ctx.unsupported(self.path, _node_label(node), 'this operation is not known to be linear')

    def _check_linear(self, node: fx.Node) -> None:
        target = node.target
        if target in (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, 'add',
                      'add_', 'sub', 'sub_') and len(self._dynamic_args(node)) < 2:
            self.ctx.unsupported(self.path, _node_label(node), 'adding a constant makes the model affine, not W(x) x')
        elif target is F.pad and node.kwargs.get('value', node.args[3] if len(node.args) > 3 else 0) not in (0, None):
            self.ctx.unsupported(self.path, _node_label(node), 'padding with a non-zero constant is affine')
        elif target is F.interpolate and node.kwargs.get('mode', 'nearest') not in _LINEAR_UPSAMPLE_MODES:
            self.ctx.unsupported(self.path, _node_label(node), 'this interpolation mode is not linear')

    def _check_product(self, node: fx.Node) -> None:
        """Products not resolved as gates: fine with a constant or parameter (layer scale) only."""
        dynamic = self._dynamic_args(node)
        if self._divides(node) and self.dynamic.get(node.args[1], False):
            self.ctx.unsupported(self.path, _node_label(node), 'division by an input-dependent tensor')
        elif len(dynamic) >= 2:
            self.ctx.unsupported(self.path, _node_label(node), 'a product of two input-dependent tensors that is not '
                                                               'a gate x * g(...), g a sigmoid/softmax/tanh on one side')


def _is_gate_module(m: nn.Module, depth: int = 2) -> bool:
    """A squashing activation module, or a module whose output comes from one (radix softmax)."""
    if isinstance(m, _GATE_MODULES) or (type(m).__module__ in _TIMM_ACTIVATION_MODULES and
                                        type(m).__name__ in ('Sigmoid', 'HardSigmoid', 'HardSigmoidMe', 'Tanh')):
        return True
    if depth == 0 or _is_activation(m) or _find_rule(m) is not None:
        return False
    try:
        graph, _ = _trace(m, False)
    except Exception:
        return False
    out = next(n for n in graph.nodes if n.op == 'output').args[0]
    if not isinstance(out, fx.Node):
        return False
    while out.op == 'call_method' and out.target in _SHAPE_ONLY:
        out = out.args[0]
    if out.op == 'call_module':
        return _is_gate_module(m.get_submodule(out.target), depth - 1)
    return (out.op == 'call_method' and out.target in _GATE_METHODS) or (
        out.op == 'call_function' and (out.target in _GATE_FUNCTIONS or out.target in _timm_functions(*_TIMM_GATES)))


def _flat_nodes(obj) -> List[fx.Node]:
    out: List[fx.Node] = []
    fx.node.map_arg(obj, lambda n: out.append(n))
    return out


def _concrete_args(fn: Callable) -> Dict[str, Any]:
    """Optional flags and inputs of a forward (``pre_logits=False``, ``children=None``) are traced at
    their defaults: fx cannot branch on a symbolic value."""
    import inspect
    params = list(inspect.signature(fn).parameters.values())[2:]  # after self and the input
    return {p.name: p.default for p in params if p.default is None or isinstance(p.default, bool)}


def _trace(module: nn.Module, training: bool, method: str = 'forward') -> Tuple[fx.Graph, Set[str]]:
    """Trace `module.<method>` in train or eval mode; returns the graph and the specialised args."""
    cls, was = type(module), module.training
    fn = getattr(cls, method)
    concrete = _concrete_args(fn)
    module.train(training)
    if method != 'forward':  # fx traces type(root).forward: trace the method through a subclass
        module.__class__ = type(cls.__name__, (cls,), {'forward': fn})
    try:
        return _Tracer(module).trace(module, concrete_args=concrete or None), set(concrete)
    finally:
        module.__class__ = cls
        module.train(was)


def _rewrite(module: nn.Module, graph: fx.Graph, plan: _Plan, gate_names: Dict[fx.Node, str]) -> None:
    """Apply a plan to a graph in place."""
    for node in plan.gate_functions:
        name = gate_names[node]
        with graph.inserting_before(node):
            new = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    for node in plan.pools:
        args = _pool_arguments(node)
        node.target = _MAX_POOLS[node.target]
        node.args, node.kwargs = (args.pop('input'),), args
    for node in plan.drop:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    graph.lint()


_POOL_PARAMS = {
    F.max_pool1d: ('input', 'kernel_size', 'stride', 'padding', 'dilation', 'ceil_mode', 'return_indices'),
    F.adaptive_max_pool1d: ('input', 'output_size', 'return_indices'),
}
_POOL_PARAMS.update({F.max_pool2d: _POOL_PARAMS[F.max_pool1d], torch.max_pool2d: _POOL_PARAMS[F.max_pool1d],
                     F.adaptive_max_pool2d: _POOL_PARAMS[F.adaptive_max_pool1d]})


def _pool_arguments(node: fx.Node) -> Dict[str, Any]:
    """Keyword arguments of the average pool equivalent to a functional max-pool node."""
    args = dict(zip(_POOL_PARAMS[node.target], node.args), **node.kwargs)
    if args.pop('return_indices', False):
        raise UnsupportedModuleError('', _node_label(node), 'max-pool indices have no average-pool equivalent')
    if any(d != 1 for d in _pair(args.pop('dilation', 1))):
        raise UnsupportedModuleError('', _node_label(node), 'a dilated max-pool has no average-pool equivalent')
    return args


def _analyse_and_rewrite(module: nn.Module, path: str, ctx: _Context, method: str = 'forward') -> None:
    """fx pass over one module's own forward (pass 1 of the module docstring)."""
    if method == 'forward' and type(module).forward is nn.Sequential.forward:
        return  # a plain chain of its children
    try:
        traces = {mode: _trace(module, mode, method) for mode in (False, True)}
    except Exception as e:  # untraceable python control flow, unsupported constructs
        ctx.unsupported(path, type(module).__name__, f'torch.fx cannot trace its forward ({type(e).__name__}: '
                                                     f'{str(e).splitlines()[0] if str(e) else ""})')
        return
    graphs = {mode: graph for mode, (graph, _) in traces.items()}
    specialised = traces[False][1]
    plans = {}
    for mode, graph in graphs.items():
        analysis = _GraphAnalysis(module, graph, specialised, path, ctx)
        analysis.run()
        ctx.gates.update(f'{path}.{t}' if path else t for t in analysis.gate_modules)
        ctx.exempt.update(f'{path}.{t}' if path else t for t in analysis.gate_internal_modules)
        plans[mode] = analysis.plan
    if all(p.empty() for p in plans.values()):
        return
    if specialised:
        ctx.unsupported(path, f'{type(module).__name__}.{method}', 'inline activations or max-pools in a forward '
                        f'with optional arguments ({", ".join(sorted(specialised))}) cannot be rewritten')
        return
    forwards = {}
    for mode, graph in graphs.items():
        gate_names = {}
        for i, node in enumerate(plans[mode].gate_functions):
            name = f'bcos_gate_{i}'
            if not hasattr(module, name):
                module.add_module(name, DynamicGate(node.target if node.op == 'call_function' else
                                                    _method_as_function(node.target)))
            gate_names[node] = name
        _rewrite(module, graph, plans[mode], gate_names)
        forwards[mode] = type(fx.GraphModule(module, graph)).forward
    _bind_forward(module, method, forwards[True], forwards[False])


def _method_as_function(name: str) -> Callable:
    def fn(x):
        return getattr(x, name.rstrip('_'))()
    fn.__name__ = name.rstrip('_')
    return fn


def _bind_forward(module: nn.Module, method: str, train_forward: Callable, eval_forward: Callable) -> None:
    """Replace the instance's method by the rewritten graphs (traced in train and eval mode)."""
    def forward(self, *args, **kwargs):
        return (train_forward if self.training else eval_forward)(self, *args, **kwargs)
    setattr(module, method, types.MethodType(forward, module))


# --- the converter ---------------------------------------------------------------------------

def _convert_tree(module: nn.Module, prefix: str, ctx: _Context) -> nn.Module:
    """Pass 1 on `module` (if it is not a rule leaf), then convert its children (pass 2)."""
    if prefix in ctx.gates and not _is_activation(module):
        return DynamicGate(module)  # a gate module (e.g. a radix softmax): kept whole, detached when explaining
    rule = _find_rule(module)
    if rule is not None:
        return rule.convert(module, ctx, prefix)
    if prefix in ctx.exempt:
        return module  # only feeds a gate: need not be linear
    qualname = f'{type(module).__module__}.{type(module).__qualname__}'
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)) and qualname not in TRUSTED_FORWARDS:
        methods = [m for m in ('forward_features', 'forward_head') if not prefix and hasattr(module, m)]
        for method in methods or ['forward']:
            _analyse_and_rewrite(module, prefix, ctx, method)
    for name, child in list(module.named_children()):
        path = f'{prefix}.{name}' if prefix else name
        new = _convert_tree(child, path, ctx)
        if new is not child:
            setattr(module, name, new)
    return module


def _module_path(model: nn.Module, target: Optional[nn.Module]) -> Optional[str]:
    return next((n for n, m in model.named_modules() if m is target), None) if target is not None else None


def _stem_paths(model: nn.Module) -> List[str]:
    """Convs that take the image: timm's pretrained_cfg['first_conv'], else the first Conv2d."""
    first = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv')
    if first:
        return [first] if isinstance(first, str) else list(first)
    return next(([n] for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), [])


def _classifier_path(model: nn.Module) -> Optional[str]:
    """timm's get_classifier(), else pretrained_cfg['classifier'], else the last Linear."""
    if hasattr(model, 'get_classifier'):
        path = _module_path(model, model.get_classifier())
        if path is not None:
            return path
    cfg_path = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    if isinstance(cfg_path, str) and isinstance(_get(model, cfg_path), nn.Linear):
        return cfg_path
    return next((n for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)


def _get(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _convert_stem(model: nn.Module, paths: Sequence[str], in_chans: int, ctx: _Context) -> None:
    for path in paths:
        conv = _get(model, path)
        if not isinstance(conv, BcosConv2d):
            raise UnsupportedModuleError(path, type(conv).__name__, 'the stem must be a convolution')
        if conv.in_channels == in_chans:
            continue
        if conv.groups != 1:
            raise UnsupportedModuleError(path, 'grouped stem conv', f'cannot change its input to {in_chans} channels')
        kwargs = dict(stride=conv.stride, dilation=conv.dilation, **ctx.bcos_kwargs())
        if isinstance(conv, BcosConv2dSame):
            new = BcosConv2dSame(in_chans, conv.out_channels, conv.kernel_size, **kwargs)
        else:
            new = BcosConv2d(in_chans, conv.out_channels, conv.kernel_size, padding=conv.padding,
                             padding_mode=conv.padding_mode, **kwargs)
        _set(model, path, new.to(device=conv.weight.device, dtype=conv.weight.dtype))


def _convert_head(model: nn.Module, path: Optional[str], ctx: _Context, head: str, logit_bias: Optional[float],
                  logit_temperature: Optional[float]) -> Optional[float]:
    """Give the classifier the logit map of Eq. 16; returns the logit bias used."""
    clf = _get(model, path) if path else None
    if not isinstance(clf, BcosLinear):
        if logit_bias is not None or head == 'conv':
            raise UnsupportedModuleError(path or '', type(clf).__name__ if clf is not None else 'no classifier',
                                         'the logit bias / conv head needs a Linear classifier')
        return None
    num_classes = clf.out_features
    if logit_bias is None:
        logit_bias = -math.log(num_classes - 1) if num_classes > 1 else 0.0
    kwargs = dict(logit_bias=logit_bias, logit_temperature=logit_temperature, **ctx.bcos_kwargs())
    if head == 'auto':
        new = BcosClassifier(clf.in_features, num_classes, **kwargs)
    else:
        parent = model.get_submodule(path.rpartition('.')[0]) if '.' in path else model
        pool = getattr(parent, 'global_pool', None)
        if pool is None or type(pool).__name__ != 'SelectAdaptivePool2d':
            raise UnsupportedModuleError(path, "head='conv'", 'needs a timm global_pool (SelectAdaptivePool2d) '
                                                              'next to the classifier')
        from timm.layers import SelectAdaptivePool2d
        parent.global_pool = SelectAdaptivePool2d(pool_type='', flatten=False)
        new = BcosConvClassifier(clf.in_features, num_classes, **kwargs)
    _set(model, path, new.to(device=clf.weight.device, dtype=clf.weight.dtype))
    return logit_bias


def unconverted_modules(model: nn.Module) -> List[str]:
    """Paths of modules a B-cos network should not contain: norms, activations (outside gates),
    max-pools, and plain convolutions / linear layers. Empty for a fully converted model."""
    gates = {id(m) for g in model.modules() if isinstance(g, DynamicGate) for m in g.modules()}
    bad = (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Conv2d, nn.Linear)
    return [f'{path} ({type(m).__name__})' for path, m in model.named_modules()
            if id(m) not in gates and not isinstance(m, (BcosConv2d, BcosLinear))
            and (isinstance(m, bad) or _is_norm(m) or _is_activation(m))]


def convert_to_bcos(
        model: nn.Module,
        *,
        b: float = 2.0,
        max_out: int = 2,
        norm: str = 'none',
        in_chans: int = 6,
        logit_bias: Optional[float] = None,
        logit_temperature: Optional[float] = None,
        head: str = 'auto',
        strict: bool = True,
) -> nn.Module:
    """Convert a CNN (any timm model or a user's own) into a B-cos network, in place.

    Args:
        model: the network; timm models keep their API (forward_features, forward_head,
            get_classifier, reset_classifier, pretrained_cfg).
        b: the exponent B of every B-cos layer (Eq. 3).
        max_out: MaxOut units per output (Eq. 17; the paper uses 2, v2 uses 1).
        norm: 'none' removes norm layers (the paper's design, with v1's output scale so the net
            trains); 'bnu' makes them bias-free and uncentered (v2), without the output scale.
        in_chans: input channels of the stem (6: the [x, 1-x] encoding of §4).
        logit_bias: the bias b of Eq. 16; default -log(C - 1), the prior 1/C under BCE.
        logit_temperature: an optional divisor of the logits (v1 uses one per model).
        head: 'auto' keeps timm's pool -> classifier (a `BcosLinear`); 'conv' puts a 1x1 B-cos conv
            before global average pooling (the v1/v2 layout).
        strict: raise `UnsupportedModuleError` for anything that would break dynamic linearity;
            False warns and leaves it.

    Returns:
        The same model object, converted, with the `BcosModelMixin` methods (explanation_mode,
        check_dynamic_linearity, explain).
    """
    if norm not in ('none', 'bnu'):
        raise ValueError(f"norm must be 'none' or 'bnu', got {norm!r}")
    if head not in ('auto', 'conv'):
        raise ValueError(f"head must be 'auto' or 'conv', got {head!r}")
    if _find_rule(model) is not None:
        raise TypeError(f'convert_to_bcos expects a network, got a single {type(model).__name__}')
    ctx = _Context(b=b, max_out=max_out, norm=norm, strict=strict, scale='auto' if norm == 'none' else None)
    stems, classifier = _stem_paths(model), _classifier_path(model)
    _convert_tree(model, '', ctx)
    _convert_stem(model, stems, in_chans, ctx)
    logit_bias = _convert_head(model, classifier, ctx, head, logit_bias, logit_temperature)
    return attach_bcos_mixin(model, dict(
        b=b, max_out=max_out, norm=norm, in_chans=in_chans, logit_bias=logit_bias,
        logit_temperature=logit_temperature, head=head, stem=stems, classifier=classifier))
