"""Pass 1 of the converter (paper §3.3): torch.fx analysis and rewrite of every custom module's own
forward, and the walk over the module tree that applies both passes (`convert_tree`).

Each forward is traced with its direct submodules as leaves (`timm_bcos.convert.tracing`), and
every inline operation is classified (`timm_bcos.convert.graph_analysis`): linear ops (residual
adds, ``torch.cat``, reshapes, average pools, layer-scale products, fixed blur filters) stay;
functional activations are removed; functional max-pools become average pools; constants added to
input-dependent tensors (biases) are removed; in a product of two input-dependent tensors, the side
that comes from a squashing activation (or, by default, the one side whose own branch has an
activation or a norm) is a *gate* and becomes a `DynamicGate` (detached in explanation mode, so
``x * g(x)`` is part of ``W(x) x``, Eq. 13). Attention is such a product (softmax(q kᵀ) v);
``F.scaled_dot_product_attention`` becomes a `DynamicAttention` (q, k detached when explaining).
Stored (1, ...) tensors added to or concatenated with the activations -- positional embeddings,
class / register / distillation tokens -- become `ExplainedConstant`s: inputs of the explanation,
so that ``f(x) = W(x) x + W_c(x) c + b`` holds exactly. Anything else cannot be shown to
keep dynamic linearity and raises `UnsupportedModuleError` (or warns, ``strict=False``). Leaf
modules are then replaced by `MODULE_RULES` (pass 2). A forward that fx cannot trace
symbolically is traced at the module's input in one forward of the model (`trace_concrete`).
"""
from __future__ import annotations

import inspect
import operator
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import fx, nn

from ..layers import ActivationGate, DynamicAttention, DynamicGate, ExplainedConstant
from .graph_analysis import GraphAnalysis, Plan
from .graph_ops import MAX_POOLS, filter_args, flat_nodes, is_addcmul, is_in_place, pool_arguments
from .rules import TRUSTED_FORWARDS, ConversionContext, UnsupportedModuleError, find_rule, is_activation
from .tracing import concrete_args, method_function

__all__ = ['RewrittenForward', 'analyse_and_rewrite', 'convert_tree']


def _rewrite(graph: fx.Graph, plan: Plan, gate_names: Dict[fx.Node, str], keep_biases: bool = False) -> None:
    """Apply a plan to a graph in place (biases before activations: a bias term may be one)."""
    for node, child in plan.module_calls.items():
        _, bias = filter_args(node)
        with graph.inserting_before(node):
            new = graph.call_module(child, (node.args[0] if node.args else node.kwargs['input'],))
            if keep_biases and bias is not None:
                new = graph.call_function(operator.add, (new, bias))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        _erase_unused(graph, bias)
    for node in plan.gate_functions + plan.kept_activations + plan.attention:
        with graph.inserting_before(node):
            new = graph.call_module(gate_names[node], node.args, node.kwargs)  # softmax(x, dim) keeps its dim
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    for node in plan.pools:
        args, _ = pool_arguments(node)  # checked by the analysis
        node.target = MAX_POOLS[node.target]
        node.args, node.kwargs = (args.pop('input'),), args
    for node in reversed(list(plan.biases)):  # the later first: an earlier one may be its term
        with graph.inserting_before(node):
            new = _bias_free_term(graph, node, plan.biases[node])
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    for node in plan.filter_biases:  # conv2d(x, weight, bias, ...): bias at position 2
        if len(node.args) > 2:
            node.args = node.args[:2] + (None,) + node.args[3:]
        else:
            node.kwargs = dict(node.kwargs, bias=None)
    for node in plan.drop:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    for node, (_, partner) in plan.constants.items():
        with graph.inserting_before(_first_user(graph, node)):
            new = graph.call_module(gate_names[node], (node, partner))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    graph.lint()


def _first_user(graph: fx.Graph, node: fx.Node) -> fx.Node:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return min(node.users, key=order.__getitem__)


def _erase_unused(graph: fx.Graph, node) -> None:
    """Erase `node` if nothing uses it any more, then its inputs likewise (a removed bias's computation)."""
    if not isinstance(node, fx.Node) or getattr(node, '_erased', False) or node.users or node.op not in (
            'get_attr', 'call_function', 'call_method') or is_in_place(node):
        return
    inputs = list(dict.fromkeys(flat_nodes((node.args, node.kwargs))))
    graph.erase_node(node)
    for n in inputs:
        _erase_unused(graph, n)


def _bias_free_term(graph: fx.Graph, node: fx.Node, position: int) -> fx.Node:
    """The input-dependent term of ``input + alpha * other`` or ``input + value * t1 * t2`` (at
    `position`, 0: input, 1: the rest), without the constant: the bias is removed."""
    names = ('input', 'tensor1', 'tensor2', 'value') if is_addcmul(node) else ('input', 'other', 'alpha')
    args = dict(zip(names, node.args), **node.kwargs)
    if position == 0:
        return args['input']
    if is_addcmul(node):
        term, scale = graph.call_function(operator.mul, (args['tensor1'], args['tensor2'])), args.get('value', 1)
    else:
        term, scale = args['other'], args.get('alpha', 1)
    if scale != 1:
        term = graph.call_function(operator.mul, (term, scale))
    if node.target in (operator.sub, operator.isub, torch.sub, torch.subtract, 'sub', 'sub_', 'subtract'):
        term = graph.call_function(operator.neg, (term,))
    return term


def analyse_and_rewrite(module: nn.Module, path: str, ctx: ConversionContext, method: str = 'forward') -> None:
    """fx pass over one module's own forward (pass 1 of the module docstring)."""
    if method == 'forward' and type(module).forward is nn.Sequential.forward:
        return  # a plain chain of its children
    try:
        traces = {mode: ctx.traces.trace_forwards(module, mode, method, lambda: ctx.example(path, method))
                  for mode in (False, True)}
    except Exception as e:  # untraceable python control flow, unsupported constructs
        if method == 'forward' and ctx.example(path, method) is None and ctx.ran_without(path):
            return  # the model's forward never calls it (Hiera's reroll for intermediates): nothing to convert
        ctx.unsupported(path, type(module).__name__, f'torch.fx cannot trace its forward ({type(e).__name__}: '
                                                     f'{str(e).splitlines()[0] if str(e) else ""})')
        return
    plans: Dict[bool, List[Plan]] = {}
    for mode, (mode_traces, is_list) in traces.items():
        kept = [(graph, specialised, _analyse(module, graph, specialised, path, ctx, optional=i > 0 and not is_list))
                for i, (graph, specialised) in enumerate(mode_traces)]
        kept = [k for k in kept if k[2] is not None]
        traces[mode] = ([(graph, specialised) for graph, specialised, _ in kept], is_list)
        plans[mode] = [plan for _, _, plan in kept]
    if all(p.empty() for mode_plans in plans.values() for p in mode_plans):
        return
    reason = _cannot_rewrite(traces)
    if reason:
        ctx.unsupported(path, f'{type(module).__name__}.{method}', reason)
        return
    fn = method_function(module, method)
    optional = frozenset(concrete_args(fn))
    variants: Dict[frozenset, Dict[bool, fx.GraphModule]] = {}
    for mode, (mode_traces, _) in traces.items():
        for (graph, specialised), plan in zip(mode_traces, plans[mode]):
            key = frozenset(specialised) & optional  # fixed inputs of a concrete trace are not a variant
            variants.setdefault(key, {})[mode] = _rewritten_graph(module, path, graph, plan, ctx)
    ctx.set(module, method, RewrittenForward(module, fn, {k: (v[True], v[False]) for k, v in variants.items()}))


def _analyse(module: nn.Module, graph: fx.Graph, specialised, path: str, ctx: ConversionContext,
             optional: bool = False) -> Optional[Plan]:
    """Run the analysis of one traced graph; record its gate modules and gate-only modules in `ctx`.
    An `optional` graph (with optional inputs given) that cannot be converted is left out (None):
    calls with those inputs then fail with a clear error."""
    analysis = GraphAnalysis(module, graph, specialised, path, ctx)
    strict = ctx.strict
    ctx.strict = strict or optional
    try:
        analysis.run()
    except UnsupportedModuleError:
        if not optional:
            raise
        return None
    finally:
        ctx.strict = strict
    ctx.gates.update(f'{path}.{t}' if path else t for t in analysis.gate_modules)
    ctx.exempt.update(f'{path}.{t}' if path else t for t in analysis.gate_internal_modules)
    return analysis.plan


def _cannot_rewrite(traces) -> Optional[str]:
    """Why a forward that needs rewrites cannot have them, or None."""
    rewrites = 'inline rewrites (activations, max-pools, biases)'
    if any(is_list for _, is_list in traces.values()):
        return f'{rewrites} in a forward traced with list inputs (one graph per list length) cannot be rewritten'
    return None


def _rewritten_graph(module: nn.Module, path: str, graph: fx.Graph, plan: Plan,
                     ctx: ConversionContext) -> fx.GraphModule:
    """Apply `plan` to `graph`; its gate functions become `DynamicGate` children of `module` (journaled)."""
    gate_names = {}
    for prefix, wrap, nodes in (
            ('bcos_gate', lambda n: DynamicGate(_function(n)), plan.gate_functions),
            ('bcos_act', lambda n: ActivationGate(_function(n)), plan.kept_activations),
            ('bcos_attn', lambda n: DynamicAttention(), plan.attention),
            ('bcos_const', lambda n: ExplainedConstant(f'{path}.{plan.constants[n][0]}' if path else
                                                       plan.constants[n][0]), list(plan.constants))):
        for i, node in enumerate(nodes):
            name = f'{prefix}_{i}'
            if not hasattr(module, name):
                ctx.set(module, name, wrap(node))
            gate_names[node] = name
    _rewrite(graph, plan, gate_names, ctx.keep_biases)
    _drop_specialisation_asserts(graph)
    return fx.GraphModule(module, graph)


def _drop_specialisation_asserts(graph: fx.Graph) -> None:
    """fx's checks that specialised arguments have their traced values: `RewrittenForward` checks
    them itself (and fx cannot unpickle a graph that calls ``_assert_is_none``)."""
    for node in list(graph.nodes):
        message = node.args[1] if node.op == 'call_function' and len(node.args) > 1 else None
        if isinstance(message, str) and 'has been specialized' in message:
            condition = node.args[0]
            graph.erase_node(node)
            if isinstance(condition, fx.Node) and condition.op == 'call_function' and not condition.users:
                graph.erase_node(condition)


def _function(node: fx.Node):
    return node.target if node.op == 'call_function' else _MethodCall(node.target)


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
    deep-copies like any other (fx regenerates their code when unpickled). Flags (``pre_logits=False``)
    were traced at their defaults, which is all the rewritten method accepts; optional tensor inputs
    (``mask=None``) were traced left out and given, one graph (`variants`, by the arguments left at
    their defaults) each.
    """

    def __init__(self, module: nn.Module, fn: Callable,
                 variants: Dict[frozenset, Tuple[fx.GraphModule, fx.GraphModule]]) -> None:
        self.module = module
        self.signature = inspect.signature(fn)
        self.defaults = concrete_args(fn)
        self.variants = variants

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(self.module, *args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        for name, default in self.defaults.items():
            if isinstance(default, bool) and values[name] != default:
                raise ValueError(f'the B-cos conversion of {type(self.module).__name__} traced its forward with '
                                 f'{name}={default!r}; it cannot take {name}={values[name]!r}')
        specialised = frozenset(k for k, v in self.defaults.items() if values[k] is v)
        if specialised not in self.variants:
            given, left = ', '.join(sorted(set(self.defaults) - specialised)), ', '.join(sorted(specialised))
            raise ValueError(f'the B-cos conversion of {type(self.module).__name__} has no graph for its forward '
                             f'with {given} given and {left or "nothing"} left out')
        graphs = self.variants[specialised]
        graph = graphs[0] if self.module.training else graphs[1]
        return type(graph).forward(*bound.args, **bound.kwargs)


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
