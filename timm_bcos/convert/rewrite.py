"""Pass 1 of the converter (paper §3.3): torch.fx analysis of every custom module's own forward, and
the walk over the module tree that applies both passes (`convert_tree`).

Each forward is traced with its direct submodules as leaves, and every inline operation is
classified: linear (residual adds, ``torch.cat``, reshapes, average pools, layer-scale products)
stays; functional activations are removed; functional max-pools become average pools; a product
of two input-dependent tensors whose one side ends in a squashing activation is a *gate* and
becomes a `DynamicGate` (detached in explanation mode, so ``x * g(x)`` is part of ``W(x) x``).
Anything else cannot be shown to keep dynamic linearity and raises `UnsupportedModuleError` (or
warns, ``strict=False``). Leaf modules are then replaced by `MODULE_RULES` (pass 2).
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..layers import DynamicGate
from .rules import (LINEAR_UPSAMPLE_MODES, TIMM_ACTIVATION_MODULES, TRUSTED_FORWARDS, ConversionContext,
                    UnsupportedModuleError, find_rule, is_activation, pair)

__all__ = ['RewrittenForward', 'analyse_and_rewrite', 'convert_tree']


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
    """Trace one module's own forward: every submodule is a leaf (converted by the module rules).

    `root` is optional because fx re-creates the tracer without arguments when it unpickles a
    rewritten forward's graph (every module is then a leaf).
    """

    def __init__(self, root: Optional[nn.Module] = None) -> None:
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
                 ctx: ConversionContext) -> None:
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
        elif target is F.interpolate and node.kwargs.get('mode', 'nearest') not in LINEAR_UPSAMPLE_MODES:
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
    if isinstance(m, _GATE_MODULES) or (type(m).__module__ in TIMM_ACTIVATION_MODULES and
                                        type(m).__name__ in ('Sigmoid', 'HardSigmoid', 'HardSigmoidMe', 'Tanh')):
        return True
    if depth == 0 or is_activation(m) or find_rule(m) is not None:
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
            new = graph.call_module(name, node.args, node.kwargs)  # softmax(x, dim) keeps its dim
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
    if any(d != 1 for d in pair(args.pop('dilation', 1))):
        raise UnsupportedModuleError('', _node_label(node), 'a dilated max-pool has no average-pool equivalent')
    return args


def analyse_and_rewrite(module: nn.Module, path: str, ctx: ConversionContext, method: str = 'forward') -> None:
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
    rewritten = {}
    for mode, graph in graphs.items():
        gate_names = {}
        for i, node in enumerate(plans[mode].gate_functions):
            name = f'bcos_gate_{i}'
            if not hasattr(module, name):
                ctx.set(module, name, DynamicGate(node.target if node.op == 'call_function' else
                                                  _MethodCall(node.target)))
            gate_names[node] = name
        _rewrite(module, graph, plans[mode], gate_names)
        rewritten[mode] = fx.GraphModule(module, graph)
    ctx.set(module, method, RewrittenForward(module, rewritten[True], rewritten[False]))


class _MethodCall:
    """``x.<name>(*args, **kwargs)`` as a function of x (out of place), for a `DynamicGate`; picklable."""

    def __init__(self, name: str) -> None:
        self.__name__ = name.rstrip('_')

    def __call__(self, x, *args, **kwargs):
        return getattr(x, self.__name__)(*args, **kwargs)


class RewrittenForward:
    """A module's rewritten method (an instance attribute in place of its class's ``forward``,
    ``forward_features``, ...): the graphs traced in train and eval mode, run on the module itself.

    The graphs are fx GraphModules holding the module's own children, so the model pickles and
    deep-copies like any other (fx regenerates their code when unpickled).
    """

    def __init__(self, module: nn.Module, train_graph: fx.GraphModule, eval_graph: fx.GraphModule) -> None:
        self.module = module
        self.graphs = (train_graph, eval_graph)

    def __call__(self, *args, **kwargs):
        graph = self.graphs[0] if self.module.training else self.graphs[1]
        return type(graph).forward(self.module, *args, **kwargs)


# --- the tree walk: pass 1 on custom modules, pass 2 on leaves -------------------------------------

def convert_tree(module: nn.Module, prefix: str, ctx: ConversionContext) -> nn.Module:
    """Pass 1 on `module` (if it is not a rule leaf), then convert its children (pass 2)."""
    if prefix in ctx.gates and not is_activation(module):
        return DynamicGate(module)  # a gate module (e.g. a radix softmax): kept whole, detached when explaining
    rule = find_rule(module)
    if rule is not None:
        return rule.convert(module, ctx, prefix)
    if prefix in ctx.exempt:
        return module  # only feeds a gate: need not be linear
    qualname = f'{type(module).__module__}.{type(module).__qualname__}'
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)) and qualname not in TRUSTED_FORWARDS:
        methods = [m for m in ('forward_features', 'forward_head') if not prefix and hasattr(module, m)]
        found = len(ctx.skipped)
        for method in methods or ['forward']:
            analyse_and_rewrite(module, prefix, ctx, method)
        if prefix and len(ctx.skipped) > found:
            # strict=False left this module's own forward as it is: it may use its children's weights
            # directly (nn.MultiheadAttention does), so they stay as they are too
            return module
    for name, child in list(module.named_children()):
        path = f'{prefix}.{name}' if prefix else name
        new = convert_tree(child, path, ctx)
        if new is not child:
            ctx.set(module, name, new)
    return module
