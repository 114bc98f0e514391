"""Classification of every node of a traced forward (pass 1 of the converter, paper §3.3).

`GraphAnalysis` finds the gates, checks that everything else keeps the network dynamic-linear
(Eq. 13) and collects the rewrites that make it so (`Plan`): activations removed, max-pools made
average pools, biases removed, the gate side of a product kept as a `DynamicGate`.
The op classes are in `timm_bcos.convert.graph_ops`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph_ops import (ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, GATE_FUNCTIONS, GATE_METHODS, GATE_MODULES,
                        LINEAR_FUNCTIONS, LINEAR_METHODS, MAX_POOLS, NORM_FUNCTIONS, SHAPE_ONLY,
                        TIMM_ACTIVATION_FUNCTIONS, TIMM_GATES, attention_args, divides, filter_args, flat_nodes, is_add,
                        is_addcmul, is_attention, is_creation, is_filter, is_in_place, is_linear_timm_function,
                        is_power, is_product, node_label, pool_arguments, timm_functions)
from .rules import (LINEAR_UPSAMPLE_MODES, TIMM_ACTIVATION_MODULES, ConversionContext, find_rule, is_activation,
                    is_linear_leaf, is_norm, keep_activation)
from .tracing import trace_forward

__all__ = ['GraphAnalysis', 'Plan', 'is_gate_module']


@dataclass
class Plan:
    """The rewrite of one module's forward.

    `drop`: activations, replaced by their input. `pools`: functional max-pools, made average
    pools. `gate_functions`: squashing activations that gate a product, made
    `DynamicGate`s. `biases`: adds of a constant to an input-dependent term and the position of
    that term (0: the first operand, 1: the second, or addcmul's product), replaced by the term.
    `filter_biases`: functional convolutions whose constant bias is removed. `kept_activations`:
    functional activations kept (B-cosification), made `ActivationGate`s. `attention`: scaled
    dot-product attentions, made `DynamicAttention`s. `constants`: tensor attributes (positional
    embeddings, tokens: the static operands, named by the tensor attributes they come from) added to
    or concatenated with the activations (and the activations they meet), made `ExplainedConstant`s.
    """
    drop: List[fx.Node] = field(default_factory=list)
    pools: List[fx.Node] = field(default_factory=list)
    gate_functions: List[fx.Node] = field(default_factory=list)
    biases: Dict[fx.Node, int] = field(default_factory=dict)
    filter_biases: List[fx.Node] = field(default_factory=list)
    kept_activations: List[fx.Node] = field(default_factory=list)
    attention: List[fx.Node] = field(default_factory=list)
    constants: Dict[fx.Node, Tuple[str, Optional[fx.Node]]] = field(default_factory=dict)
    module_calls: Dict[fx.Node, str] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.drop or self.pools or self.gate_functions or self.biases or self.filter_biases or
                    self.kept_activations or self.attention or self.constants or self.module_calls)


class GraphAnalysis:
    """Classify every node of a traced forward; collect gates and the rewrites it needs.

    A *gate* is the side of a product of two input-dependent tensors that comes (through linear
    ops of that side alone: reshapes, interpolation, pooling, scaling) from a squashing activation
    -- sigmoid, hard-sigmoid, softmax, tanh, a module whose output does -- or from a ratio of
    input-dependent tensors (a normalised response, GRN's ``||x|| / mean ||x||``). An argument that
    sets a module's weights per sample (`ModuleRule.weight_args`: CondConv's routing) is gated
    likewise. With ``ctx.gate_rule == 'nonlinear'`` (the default) a product with no such side is
    still gated when exactly one side's own branch has a non-linearity (an activation or a norm:
    GLU-style ``act(g) * x``, gMLP's spatial gating, FocalNet's modulator) -- that side is the gate.
    A gate's value must go only into the products (weights) it gates: detached in explanation mode,
    the product is then part of ``W(x) x`` (Eq. 13). Nodes that only feed gates are exempt from the
    linearity checks.
    """

    def __init__(self, module: nn.Module, graph: fx.Graph, static_inputs: Set[str], path: str,
                 ctx: ConversionContext) -> None:
        self.module, self.graph, self.path, self.ctx = module, graph, path, ctx
        self.static_inputs = static_inputs
        self.dynamic: Dict[fx.Node, bool] = {}
        self.plan = Plan()
        self.gate_modules: Set[str] = set()
        self.gate_internal_modules: Set[str] = set()

    def run(self) -> None:
        written = []  # constants an input-dependent value is written into in place
        for node in self.graph.nodes:
            self.dynamic[node] = self._is_dynamic(node)
            target = node.args[0] if node.args else None
            if self.dynamic[node] and is_in_place(node) and isinstance(target, fx.Node) and not self.dynamic[target]:
                self.dynamic[target] = True  # its later uses depend on the input
                written.append(node)
        for node in written:
            self._refuse(node, 'writing an input-dependent value in place into a constant tensor')
        gates, skip = self._find_gates()
        internal = self._gate_internal(gates)
        skip = skip | self._sizes()
        for node in self.graph.nodes:
            if node in skip:
                continue
            if node in gates:
                if node.op == 'call_module':
                    self.gate_modules.add(node.target)
                elif node.op != 'placeholder':
                    self.plan.gate_functions.append(node)
            elif node.op == 'call_module' and (node in internal or not self.dynamic[node]):
                self.gate_internal_modules.add(node.target)  # only feeds a gate, or computes a constant
            elif node.op in ('call_function', 'call_method') and self.dynamic[node]:
                self._check(node, lenient=node in internal)
            elif node.op == 'call_module' and self.dynamic[node]:
                self._module_constants(node)

    def _is_dynamic(self, node: fx.Node) -> bool:
        if node.op == 'placeholder':  # the inputs, except specialised flags (fx names them pre_logits_1)
            return node.target.rstrip('_0123456789') not in self.static_inputs
        if node.op in ('get_attr', 'output'):
            return node.op == 'output'
        if is_creation(node):
            return False
        return any(self._depends(a) for a in flat_nodes((node.args, node.kwargs)))

    def _depends(self, value: Any) -> bool:
        """Whether an argument value (a node, constant or container) is input-dependent."""
        return any(self.dynamic.get(n, False) for n in flat_nodes(value))

    def _dynamic_args(self, node: fx.Node) -> List[fx.Node]:
        return [a for a in flat_nodes((node.args, node.kwargs)) if self._depends(a)]

    # --- gates ---------------------------------------------------------------------------------

    def _find_gates(self) -> Tuple[Set[fx.Node], Set[fx.Node]]:
        """The gates, and the nodes the checks skip: gated products and the ops between a gate and
        its product. Candidates whose value also goes elsewhere are dropped, until none does."""
        candidates: Dict[fx.Node, List[List[fx.Node]]] = {}  # gated product / module call -> gate chains
        for node in self.graph.nodes:
            operands = self._gated_operands(node)
            chains = [c for c in (self._gate_chain(a) for a in operands) if c is not None]
            if node.op == 'call_module' and chains:
                candidates[node] = chains
            elif node.op != 'call_module':
                if not chains and len(operands) == 2 and self.ctx.gate_rule == 'nonlinear':
                    chains = self._nonlinear_side(node, operands)
                if len(chains) == 1:
                    candidates[node] = chains
        while True:
            allowed = set(candidates) | {n for chains in candidates.values() for c in chains for n in c}
            leaking = [k for k, chains in candidates.items()
                       if any(u not in allowed for c in chains for n in c for u in n.users)]
            if not leaking:
                break
            for k in leaking:
                del candidates[k]
        gates = {c[-1] for chains in candidates.values() for c in chains}
        skip = {n for chains in candidates.values() for c in chains for n in c[:-1]}
        return gates, skip | {k for k in candidates if k.op != 'call_module'}

    def _gated_operands(self, node: fx.Node) -> List[fx.Node]:
        """The operands a gate may come from: both sides of a product of two input-dependent tensors,
        the weight arguments of a module (`ModuleRule.weight_args`)."""
        if is_product(node) and not divides(node):
            operands = self._dynamic_args(node)
            return operands if len(operands) == 2 else []
        if node.op == 'call_module':
            rule = find_rule(self.module.get_submodule(node.target))
            positions = rule.weight_args if rule is not None else ()
            weights = [a for i, a in enumerate(node.args[1:]) if i in positions]
            return [a for a in weights if isinstance(a, fx.Node) and self._depends(a)]
        return []

    def _gate_chain(self, node: fx.Node) -> Optional[List[fx.Node]]:
        """[operand, ..., gate]: the linear ops of one input-dependent argument from a gate to the
        operand; None if it does not come from one."""
        chain = [node]
        while not self._is_gate_source(node):
            if node.op == 'call_method' and node.target in SHAPE_ONLY:  # g.expand_as(x): x gives only a shape
                node = node.args[0]
            else:
                dynamic = self._dynamic_args(node)
                linear = is_product(node) or (node.op == 'call_method' and node.target in LINEAR_METHODS) or (
                    node.op == 'call_function' and node.target in LINEAR_FUNCTIONS) or (
                    node.op == 'call_module' and is_linear_leaf(self.module.get_submodule(node.target)))
                if len(dynamic) != 1 or not linear:
                    return None
                node = dynamic[0]
            if not isinstance(node, fx.Node):
                return None
            chain.append(node)
        return chain

    def _nonlinear_side(self, product: fx.Node, operands: List[fx.Node]) -> List[List[fx.Node]]:
        """[[operand]] for the one operand of `product` whose own branch (the nodes that feed only
        it) has an activation or a norm while the other's has none; [] if both or neither do."""
        if operands[0] is operands[1] or any(set(a.users) != {product} for a in operands):
            return []
        sides = [any(self._is_nonlinear(n) for n in self._own_branch(a)) for a in operands]
        return [[operands[sides.index(True)]]] if sum(sides) == 1 else []

    def _own_branch(self, node: fx.Node) -> Set[fx.Node]:
        """`node` and the input-dependent nodes whose every use leads only into it."""
        branch, order = {node}, list(self.graph.nodes)
        for n in reversed(order[:order.index(node)]):
            if self.dynamic.get(n) and n.users and all(u in branch for u in n.users):
                branch.add(n)
        return branch

    def _is_nonlinear(self, node: fx.Node) -> bool:
        """An activation, a norm (a module holding one), a ratio or a power of the input."""
        if node.op == 'call_module':
            return any(is_activation(m) or is_norm(m) for m in self.module.get_submodule(node.target).modules())
        method = node.op == 'call_method'
        return (method and node.target in ACTIVATION_METHODS) or (not method and (
            node.target in ACTIVATION_FUNCTIONS or node.target in NORM_FUNCTIONS or
            node.target in timm_functions(*TIMM_ACTIVATION_FUNCTIONS))) or is_power(node) or (
            divides(node) and len(self._dynamic_args(node)) == 2)

    def _is_gate_source(self, node: fx.Node) -> bool:
        if node.op == 'call_module':
            return is_gate_module(self.module.get_submodule(node.target))
        if divides(node):
            return len(self._dynamic_args(node)) == 2  # a ratio: a normalised response
        return _is_gate_call(node)

    def _gate_internal(self, gates: Set[fx.Node]) -> Set[fx.Node]:
        """Nodes whose every use leads only into gates (computed in reverse order)."""
        internal: Set[fx.Node] = set()
        for node in reversed(list(self.graph.nodes)):
            if node in gates or node.op in ('placeholder', 'output'):
                continue
            users = list(node.users)
            if users and all(u in gates or u in internal or _sets_attention(node, u) for u in users):
                internal.add(node)
        return internal

    def _sizes(self) -> Set[fx.Node]:
        """Nodes whose every use is as a size (a view's shape, an assert on shapes): ints, whatever
        their source (CoaT's ``H * W`` of a size argument)."""
        sizes: Set[fx.Node] = set()
        for node in reversed(list(self.graph.nodes)):
            if _is_assert(node):
                sizes.add(node)
            elif node.op in ('call_function', 'call_method', 'placeholder') and node.users and all(
                    _size_use(node, u) or u in sizes for u in node.users):
                sizes.add(node)
        return sizes

    # --- checks and rewrites --------------------------------------------------------------------

    def _check(self, node: fx.Node, lenient: bool) -> None:
        """Rewrite activations and max-pools; check the rest is linear (not on a gate's path)."""
        target, method = node.target, node.op == 'call_method'
        if (method and target in ACTIVATION_METHODS) or (not method and (
                target in ACTIVATION_FUNCTIONS or target in timm_functions(*TIMM_ACTIVATION_FUNCTIONS))):
            self._activation(node)
        elif not method and target in MAX_POOLS:
            if self.ctx.max_pool != 'keep':
                self._check_pool(node)
        elif lenient:
            return  # only feeds a gate, whose value is detached in explanation mode
        elif is_power(node):
            self._check_power(node)
        elif is_addcmul(node):
            self._check_addcmul(node)
        elif is_filter(node):
            self._check_filter(node)
        elif is_attention(node):
            self._check_attention(node)
        elif node.op == 'call_function' and node.target in (torch.cat, torch.concat, torch.stack):
            self._check_concat(node)
        elif is_linear_timm_function(node):
            return
        elif is_product(node):
            self._check_product(node)
        elif (method and target in LINEAR_METHODS) or (not method and target in LINEAR_FUNCTIONS):
            self._check_linear(node)
        else:
            self._refuse(node, 'this operation is not known to be linear')

    def _activation(self, node: fx.Node) -> None:
        """Removed, or kept as a gate ``x * g(x)`` (B-cosification)."""
        if self.ctx.activations != 'keep':
            self.plan.drop.append(node)
        elif node.op == 'call_method' or keep_activation(node.target, self.ctx, self.path) is not None:
            self.plan.kept_activations.append(node)

    def _refuse(self, node: fx.Node, reason: str) -> None:
        self.ctx.unsupported(self.path, node_label(node), reason)

    def _check_pool(self, node: fx.Node) -> None:
        _, reason = pool_arguments(node)
        if reason:
            self._refuse(node, reason)
        else:
            self.plan.pools.append(node)

    def _check_power(self, node: fx.Node) -> None:
        """``x ** p`` with a constant exponent is an activation (StarReLU's ``relu(x) ** 2``): removed."""
        if self._dynamic_args(node) == [node.args[0]]:
            self._activation(node)
        else:
            self._refuse(node, 'a power with an input-dependent exponent is not linear')

    def _check_linear(self, node: fx.Node) -> None:
        target = node.target
        if is_add(node) and len(self._dynamic_args(node)) < 2:
            if self.ctx.keep_biases:
                return
            first = node.args[0] if node.args else node.kwargs.get('input')
            constant = node.args[1] if self._depends(first) else first
            sources = self._constant_sources(constant)
            if sources and all(_positional(self._attr(s)) for s in sources):
                self._explain_constant(constant, sources, node.args[1] if constant is first else first)
            else:
                self.plan.biases[node] = 0 if self._depends(first) else 1
        elif target is F.pad and node.kwargs.get(
                'value', node.args[3] if len(node.args) > 3 else 0) not in (0, None):
            self._refuse(node, 'padding with a non-zero constant is affine')
        elif target is F.interpolate and node.kwargs.get(
                'mode', 'nearest') not in LINEAR_UPSAMPLE_MODES:
            self._refuse(node, 'this interpolation mode is not linear')

    def _check_attention(self, node: fx.Node) -> None:
        """Linear in the value for a fixed attention matrix (query, key and mask detached when explaining)."""
        if self._depends(attention_args(node)['value']):
            self.plan.attention.append(node)
        else:
            self._refuse(node, 'attention whose value does not depend on the input (only its weights do) is not '
                               'linear')

    def _check_concat(self, node: fx.Node) -> None:
        """Concatenated constants (class / register tokens) are explained inputs; nothing else constant may be."""
        tensors = node.args[0] if node.args else node.kwargs.get('tensors')
        tensors = tensors if isinstance(tensors, (list, tuple)) else ()
        partner = next((t for t in tensors if self._depends(t)), None)
        for t in tensors:
            if isinstance(t, fx.Node) and not self._depends(t):
                sources = self._constant_sources(t)
                if sources is None or not all(self._attr(s).shape[:1] == (1,) for s in sources):
                    self._refuse(node, 'concatenating a constant that is not a stored (1, ...) tensor (a token) is '
                                       'affine')
                    return
                self._explain_constant(t, sources, partner)

    def _module_constants(self, node: fx.Node) -> None:
        """Learned (1, ...) tensors passed to a child with the activations (CaiT's class token into its
        class-attention blocks) are inputs there: explained constants."""
        args = flat_nodes((node.args, node.kwargs))
        partner = next((a for a in args if self._depends(a)), None)
        for arg in args:
            if self._depends(arg):
                continue
            sources = self._constant_sources(arg)
            values = [self._attr(s) for s in sources or ()]
            if values and all(isinstance(v, nn.Parameter) and v.shape[:1] == (1,) for v in values):
                self._explain_constant(arg, sources, partner)

    def _explain_constant(self, operand: fx.Node, sources: List[fx.Node], partner: Optional[fx.Node]) -> None:
        """Plan `operand` as an `ExplainedConstant`, named by the attributes it comes from."""
        self.plan.constants[operand] = ('+'.join(s.target for s in sources), partner)

    def _attr(self, node: fx.Node) -> Any:
        value = self.module
        for name in node.target.split('.'):
            value = getattr(value, name)
        return value

    def _constant_sources(self, value: Any) -> Optional[List[fx.Node]]:
        """The tensor attributes a static value is a linear function of (through reshapes, expansion,
        interpolation); None if it is anything else."""
        if not isinstance(value, fx.Node):
            return []
        if value.op == 'get_attr':
            return [value] if isinstance(self._attr(value), torch.Tensor) else None
        if value.op == 'call_function' and value.target is getattr:
            return []  # a shape
        linear = (value.op == 'call_method' and value.target in LINEAR_METHODS | SHAPE_ONLY) or is_linear_timm_function(
            value) or (value.op == 'call_function' and value.target in LINEAR_FUNCTIONS)
        if not linear:
            return None
        found: List[fx.Node] = []
        for arg in flat_nodes((value.args, value.kwargs)):
            sources = self._constant_sources(arg)
            if sources is None:
                return None
            found.extend(sources)
        return found

    def _check_addcmul(self, node: fx.Node) -> None:
        """``input + value * t1 * t2`` (GRN's ``beta + gamma * (x * N(x))``): a constant input is a bias."""
        args = dict(zip(('input', 'tensor1', 'tensor2'), node.args), **node.kwargs)
        dynamic_factors = [k for k in ('tensor1', 'tensor2') if self._depends(args.get(k))]
        if len(dynamic_factors) == 2:
            self._refuse(node, 'a product of two input-dependent tensors that is not a gate')
        elif (not self._depends(args.get('input')) or not dynamic_factors) and not self.ctx.keep_biases:
            self.plan.biases[node] = 1 if dynamic_factors else 0

    def _check_filter(self, node: fx.Node) -> None:
        """A functional convolution with a constant kernel (a blur / anti-alias filter) is linear;
        ``F.linear(x, self.<linear>.weight, bias)`` is a call of that linear layer (BEiT's qkv with
        its separate q / v biases), which the rules make a B-cos layer."""
        weight, bias = filter_args(node)
        if self._depends(weight):
            self._refuse(node, 'a convolution whose weight depends on the input is not a B-cos layer')
        elif self._linear_module_weight(node, weight):
            if self._depends(bias):
                self._refuse(node, 'an input-dependent bias is not linear')
            else:
                self.plan.module_calls[node] = weight.target.rpartition('.')[0]
        elif self._learned(weight):
            self._refuse(node, 'a functional convolution with a learned weight (a Parameter) is not converted; '
                               'use an nn.Conv2d / nn.Linear module, which the rules make a B-cos layer')
        elif self._depends(bias):
            self._refuse(node, 'an input-dependent bias is not linear')
        elif bias is not None and not self.ctx.keep_biases:
            self.plan.filter_biases.append(node)

    def _linear_module_weight(self, node: fx.Node, weight: Any) -> bool:
        """``F.linear``'s weight is the weight of an ``nn.Linear`` child of this module."""
        if node.target is not F.linear or not isinstance(weight, fx.Node) or weight.op != 'get_attr':
            return False
        owner, _, attr = weight.target.rpartition('.')
        return attr == 'weight' and isinstance(self.module.get_submodule(owner) if owner else None, nn.Linear)

    def _learned(self, node: Any) -> bool:
        """Whether a static value is computed from a learned parameter."""
        if not isinstance(node, fx.Node):
            return isinstance(node, nn.Parameter)
        if node.op == 'get_attr':
            value = self._attr(node)
            return isinstance(value, nn.Parameter) or getattr(value, 'requires_grad', False)
        return any(self._learned(a) for a in flat_nodes((node.args, node.kwargs)))

    def _check_product(self, node: fx.Node) -> None:
        """Products not resolved as gates: fine with a constant or parameter (layer scale) only."""
        dynamic = self._dynamic_args(node)
        if divides(node) and self._depends(node.args[1]):
            self._refuse(node, 'division by an input-dependent tensor')
        elif len(dynamic) >= 2:
            either = (' or a branch with an activation or a norm on one side only' if self.ctx.gate_rule == 'nonlinear'
                      else " (gate_rule='bounded')")
            self._refuse(node, 'a product of two input-dependent tensors that is not a gate x * g(...), g a '
                               f'bounded activation (sigmoid, softmax, tanh, ReLU6) or a ratio on one side{either}')


_SIZE_ARGUMENT_METHODS = {'view', 'reshape', 'expand', 'repeat', 'tile', 'unflatten', 'new_zeros', 'new_ones',
                          'new_empty', 'new_full'}


def _is_assert(node: fx.Node) -> bool:
    """``torch._assert`` or timm's ``_assert`` (on shapes)."""
    return node.op == 'call_function' and (node.target is torch._assert or getattr(node.target, '__name__', '') in (
        '_assert', '_assert_async'))


def _size_use(node: fx.Node, user: fx.Node) -> bool:
    """`user` takes `node` as a size: a shape argument (not the tensor) of a view, or an assert."""
    return _is_assert(user) or (user.op == 'call_method' and user.target in _SIZE_ARGUMENT_METHODS and
                                user.args[0] is not node)


def _sets_attention(node: fx.Node, user: fx.Node) -> bool:
    """`node` is only the query, key or mask of the attention `user` (detached there when explaining)."""
    if not is_attention(user):
        return False
    args = attention_args(user)
    return args['value'] is not node and node in (args['query'], args['key'], args['attn_mask'])


def _positional(value: Any) -> bool:
    """A (1, ...) tensor that varies along more than one dimension: a positional embedding (1, N, C)
    or (1, C, H, W), not a per-channel bias."""
    return isinstance(value, torch.Tensor) and value.shape[:1] == (1,) and sum(d > 1 for d in value.shape) > 1


def _is_gate_call(node: fx.Node) -> bool:
    return (node.op == 'call_method' and node.target in GATE_METHODS) or (node.op == 'call_function' and (
        node.target in GATE_FUNCTIONS or node.target in timm_functions(*TIMM_GATES)))


def is_gate_module(m: nn.Module, depth: int = 2) -> bool:
    """A squashing activation module, or a module whose output comes from one (radix softmax)."""
    if isinstance(m, GATE_MODULES) or (type(m).__module__ in TIMM_ACTIVATION_MODULES and
                                       type(m).__name__ in ('Sigmoid', 'HardSigmoid', 'HardSigmoidMe', 'Tanh')):
        return True
    if depth == 0 or is_activation(m) or find_rule(m) is not None:
        return False
    try:
        graph, _ = trace_forward(m, False)
    except Exception:
        return False
    out = next(n for n in graph.nodes if n.op == 'output').args[0]
    if not isinstance(out, fx.Node):
        return False
    while out.op == 'call_method' and out.target in SHAPE_ONLY:
        out = out.args[0]
    if out.op == 'call_module':
        return is_gate_module(m.get_submodule(out.target), depth - 1)
    return _is_gate_call(out)
