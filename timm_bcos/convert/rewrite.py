"""Pass 1 of the converter (paper §3.3): torch.fx analysis and rewrite of every custom module's own
forward, and the walk over the module tree that applies both passes (`convert_tree`).

Each forward is traced with its direct submodules as leaves (`timm_bcos.convert.tracing`), and
every inline operation is classified (`timm_bcos.convert.graph_analysis`): linear ops (residual
adds, ``torch.cat``, reshapes, average pools, layer-scale products, fixed blur filters) stay;
functional activations are removed; functional max-pools become average pools; constants added to
input-dependent tensors (biases) are removed; in a product of two input-dependent tensors, the side
that comes from a squashing activation (or, by default, the one side whose own branch has an
activation or a norm) is a *gate* and becomes a `DynamicGate` (detached in explanation mode, so
``x * g(x)`` is part of ``W(x) x``, Eq. 13). Anything else cannot be shown to
keep dynamic linearity and raises `UnsupportedModuleError` (or warns, ``strict=False``). Leaf
modules are then replaced by `MODULE_RULES` (pass 2).
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional

import torch
from torch import fx, nn

from ..layers import ActivationGate, DynamicGate
from .graph_analysis import GraphAnalysis, Plan
from .graph_ops import MAX_POOLS, is_addcmul, pool_arguments
from .rules import TRUSTED_FORWARDS, ConversionContext, find_rule, is_activation

__all__ = ['RewrittenForward', 'analyse_and_rewrite', 'convert_tree']


def _rewrite(graph: fx.Graph, plan: Plan, gate_names: Dict[fx.Node, str]) -> None:
    """Apply a plan to a graph in place (biases before activations: a bias term may be one)."""
    for node in plan.gate_functions + plan.kept_activations:
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
    graph.lint()


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
        traces = {mode: ctx.traces.trace_forwards(module, mode, method) for mode in (False, True)}
    except Exception as e:  # untraceable python control flow, unsupported constructs
        ctx.unsupported(path, type(module).__name__, f'torch.fx cannot trace its forward ({type(e).__name__}: '
                                                     f'{str(e).splitlines()[0] if str(e) else ""})')
        return
    plans: Dict[bool, List[Plan]] = {}
    for mode, (mode_traces, _) in traces.items():
        plans[mode] = [_analyse(module, graph, specialised, path, ctx) for graph, specialised in mode_traces]
    if all(p.empty() for mode_plans in plans.values() for p in mode_plans):
        return
    reason = _cannot_rewrite(traces)
    if reason:
        ctx.unsupported(path, f'{type(module).__name__}.{method}', reason)
        return
    rewritten = {}
    for mode, (((graph, _),), _) in traces.items():
        rewritten[mode] = _rewritten_graph(module, graph, plans[mode][0], ctx)
    ctx.set(module, method, RewrittenForward(module, rewritten[True], rewritten[False]))


def _analyse(module: nn.Module, graph: fx.Graph, specialised, path: str, ctx: ConversionContext) -> Plan:
    """Run the analysis of one traced graph; record its gate modules and gate-only modules in `ctx`."""
    analysis = GraphAnalysis(module, graph, specialised, path, ctx)
    analysis.run()
    ctx.gates.update(f'{path}.{t}' if path else t for t in analysis.gate_modules)
    ctx.exempt.update(f'{path}.{t}' if path else t for t in analysis.gate_internal_modules)
    return analysis.plan


def _cannot_rewrite(traces) -> Optional[str]:
    """Why a forward that needs rewrites cannot have them, or None."""
    rewrites = 'inline rewrites (activations, max-pools, biases)'
    if any(is_list for _, is_list in traces.values()):
        return f'{rewrites} in a forward traced with list inputs (one graph per list length) cannot be rewritten'
    specialised = traces[False][0][0][1]
    if specialised:
        return (f'{rewrites} in a forward with optional arguments ({", ".join(sorted(specialised))}) cannot be '
                f'rewritten')
    return None


def _rewritten_graph(module: nn.Module, graph: fx.Graph, plan: Plan, ctx: ConversionContext) -> fx.GraphModule:
    """Apply `plan` to `graph`; its gate functions become `DynamicGate` children of `module` (journaled)."""
    gate_names = {}
    for prefix, wrap, nodes in (('bcos_gate', DynamicGate, plan.gate_functions),
                                ('bcos_act', ActivationGate, plan.kept_activations)):
        for i, node in enumerate(nodes):
            name = f'{prefix}_{i}'
            if not hasattr(module, name):
                ctx.set(module, name, wrap(node.target if node.op == 'call_function' else _MethodCall(node.target)))
            gate_names[node] = name
    _rewrite(graph, plan, gate_names)
    return fx.GraphModule(module, graph)


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
