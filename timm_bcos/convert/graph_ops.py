"""The op tables of the fx pass (paper §3.3): how each inline operation of a traced forward is classified.

Every operation of a custom module's forward falls in one class: linear (kept), an activation
(removed), a max-pool (made an average pool), a product (a layer scale, or a gate ``x * g(x)``), a
bias (a constant added to an input-dependent tensor: removed, as every bias of the network is,
so that the only bias left is the logit bias of Eq. 16), a fixed linear filter (a functional
convolution with a constant kernel: kept), or static (a function of shapes and constants only).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    'ACTIVATION_FUNCTIONS', 'ACTIVATION_METHODS', 'ADDS', 'ATTENTION_FUNCTIONS', 'GATE_FUNCTIONS', 'GATE_METHODS',
    'GATE_MODULES', 'LINEAR_FUNCTIONS', 'LINEAR_METHODS', 'LINEAR_TIMM_FUNCTIONS', 'MAX_POOLS', 'NORM_FUNCTIONS',
    'POWERS', 'SHAPE_ONLY', 'TIMM_ACTIVATION_FUNCTIONS', 'TIMM_GATES', 'attention_args', 'divides', 'filter_args',
    'flat_nodes', 'is_add', 'is_addcmul', 'is_attention', 'is_creation', 'is_filter', 'is_in_place',
    'is_linear_timm_function', 'is_power', 'is_product', 'node_label', 'pool_arguments', 'timm_functions',
]


def timm_functions(*names: str) -> Tuple[Callable, ...]:
    """timm's functional activations by name (absent ones are skipped: timm versions differ)."""
    import timm.layers.activations as act
    import timm.layers.activations_me as act_me
    return tuple(getattr(mod, n) for mod in (act, act_me) for n in names if hasattr(mod, n))


ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.elu, F.elu_, F.leaky_relu, F.leaky_relu_, F.selu, F.celu, F.softplus,
    F.sigmoid, torch.sigmoid, torch.tanh, F.tanh, torch.clamp, torch.clamp_min, torch.clip, F.softmax,
    torch.softmax,
}
ACTIVATION_METHODS = {'relu', 'relu_', 'sigmoid', 'sigmoid_', 'tanh', 'tanh_', 'clamp', 'clamp_', 'clamp_min',
                      'clamp_min_', 'clip', 'clip_', 'softmax'}
TIMM_ACTIVATION_FUNCTIONS = (
    'swish', 'mish', 'sigmoid', 'tanh', 'hard_swish', 'hard_sigmoid', 'hard_mish', 'gelu', 'gelu_tanh',
    'quick_gelu', 'swish_me', 'mish_me', 'hard_sigmoid_me', 'hard_swish_me', 'hard_mish_me')
# Powers of an input-dependent base with a constant exponent (StarReLU's relu(x) ** 2): activations.
POWERS = {operator.pow, operator.ipow, torch.pow, torch.square, 'pow', 'pow_', 'square', 'square_'}
# Bounded activations that make a product a gate: squashing (sigmoid, softmax, tanh) or clipped
# (ReLU6, hardtanh: StarNet's act(x1) * x2). A ReLU, GELU or SiLU on one side does not: unbounded, the
# product would grow with the square of the input.
GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax, torch.softmax, torch.tanh, F.tanh, F.relu6,
                  F.hardtanh}
GATE_METHODS = {'sigmoid', 'sigmoid_', 'softmax', 'tanh', 'tanh_'}
TIMM_GATES = ('sigmoid', 'hard_sigmoid', 'hard_sigmoid_me', 'tanh')
GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Tanh, nn.Hardtanh)  # Hardtanh: ReLU6 too
# Functional normalisations: non-linear (a ratio of the input and its statistics).
NORM_FUNCTIONS = {F.normalize, F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm, F.local_response_norm,
                  *((F.rms_norm,) if hasattr(F, 'rms_norm') else ())}
MAX_POOLS = {F.max_pool1d: F.avg_pool1d, F.max_pool2d: F.avg_pool2d, torch.max_pool2d: F.avg_pool2d,
             F.adaptive_max_pool2d: F.adaptive_avg_pool2d, F.adaptive_max_pool1d: F.adaptive_avg_pool1d}
ADDS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, torch.subtract,
        'add', 'add_', 'sub', 'sub_', 'subtract'}
LINEAR_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.neg, operator.pos, operator.getitem,
    torch.add, torch.sub, torch.neg, torch.cat, torch.concat, torch.stack, torch.split, torch.chunk,
    torch.unbind, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, torch.narrow, torch.roll, torch.flip, torch.mean, torch.sum, torch.tile, torch.repeat_interleave,
    F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle,
    F.interpolate, F.pad, torch.movedim, F.unfold, F.fold, torch.amax,
}
# timm functions that fx keeps as leaves (`register_notrace_function`) and that are linear in their
# tensor inputs (each was read): window / grid / block partitions and their reverses (reshapes and
# permutes), crops and interpolations, token pools, a mask added to attention scores.
LINEAR_TIMM_FUNCTIONS = {
    'timm.models.swin_transformer': ('window_reverse',), 'timm.models.swin_transformer_v2': ('window_reverse',),
    'timm.models.swin_transformer_v2_cr': ('window_reverse',), 'timm.models.davit': ('window_reverse',),
    'timm.models.gcvit': ('window_reverse',),
    'timm.models.maxxvit': ('window_reverse', 'window_reverse_nchw', 'grid_reverse', 'grid_reverse_nchw'),
    'timm.models.nest': ('deblockify',), 'timm.models.mvitv2': ('reshape_pre_pool', 'reshape_post_pool'),
    'timm.models.crossvit': ('scale_image',), 'timm.models.naflexvit': ('global_pool_naflex',),
    'timm.layers.pos_embed': ('resample_abs_pos_embed', 'resample_abs_pos_embed_nhwc'),
    'timm.layers.attention': ('maybe_add_mask',),
}
# Scaled dot-product attention: linear in the value for a fixed attention matrix (`DynamicAttention`).
ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention}
_ATTENTION_PARAMS = ('query', 'key', 'value', 'attn_mask')
_PRODUCTS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div,
             operator.matmul, torch.matmul, torch.einsum, torch.bmm}
LINEAR_METHODS = {
    'view', 'reshape', 'flatten', 'unflatten', 'permute', 'transpose', 'contiguous', 'unsqueeze', 'squeeze',
    'expand', 'expand_as', 'repeat', 'narrow', 'split', 'chunk', 'unbind', 'mean', 'sum', 'add', 'add_',
    'sub', 'sub_', 'neg', 'to', 'type_as', 'float', 'double', 'half', 'bfloat16', 'clone', 'roll', 'flip',
    'view_as', 'reshape_as', 'movedim', '__getitem__', 'tile', 'repeat_interleave', 'unfold',
    'amax', 'max',  # a maximum over a dimension selects an input: exact (Eq. 13) as it is
    'append', 'extend', 'insert',  # building a list passed in (vovnet's concat_list): no arithmetic
}
_PRODUCT_METHODS = {'mul', 'mul_', 'div', 'div_', 'matmul'}
# Values that depend on their input only through its shape, dtype and device: static.
_STATIC_METHODS = {'size', 'dim', 'numel', 'ndimension', 'new_empty', 'new_zeros', 'new_ones', 'new_full'}
_CREATION_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
                       torch.randn_like, torch.randint_like, torch.zeros, torch.ones, torch.empty, torch.full,
                       torch.arange, torch.linspace, torch.eye}
SHAPE_ONLY = {'view', 'reshape', 'flatten', 'unflatten', 'expand', 'expand_as', 'unsqueeze', 'squeeze',
              'permute', 'transpose', 'contiguous', 'view_as', 'reshape_as', 'to', 'type_as'}
# Functional linear maps, ``f(input, weight, bias=None, ...)``.
_FILTERS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear}


def node_label(node: fx.Node) -> str:
    target = getattr(node.target, '__name__', node.target)
    return f'{node.op} {target!s} (fx node {node.name!r})'


def flat_nodes(obj) -> List[fx.Node]:
    """Every fx node in a (nested) argument structure."""
    out: List[fx.Node] = []
    fx.node.map_arg(obj, lambda n: out.append(n))
    return out


def is_linear_timm_function(node: fx.Node) -> bool:
    target = node.target
    return node.op == 'call_function' and getattr(target, '__name__', None) in LINEAR_TIMM_FUNCTIONS.get(
        getattr(target, '__module__', None), ())


def is_attention(node: fx.Node) -> bool:
    return node.op == 'call_function' and node.target in ATTENTION_FUNCTIONS


def attention_args(node: fx.Node) -> Dict[str, Any]:
    """query, key, value and attn_mask of a scaled dot-product attention node (absent ones: None)."""
    args = dict(zip(_ATTENTION_PARAMS, node.args), **{k: v for k, v in node.kwargs.items() if k in _ATTENTION_PARAMS})
    return {k: args.get(k) for k in _ATTENTION_PARAMS}


def _calls(node: fx.Node, targets) -> bool:
    return node.op in ('call_function', 'call_method') and node.target in targets


def is_product(node: fx.Node) -> bool:
    return (node.op == 'call_method' and node.target in _PRODUCT_METHODS) or (
        node.op == 'call_function' and node.target in _PRODUCTS)


def divides(node: fx.Node) -> bool:
    return _calls(node, (operator.truediv, operator.itruediv, torch.div, 'div', 'div_'))


def is_add(node: fx.Node) -> bool:
    return _calls(node, ADDS)


def is_addcmul(node: fx.Node) -> bool:
    return _calls(node, (torch.addcmul, 'addcmul', 'addcmul_'))


def is_power(node: fx.Node) -> bool:
    return _calls(node, POWERS)


def is_in_place(node: fx.Node) -> bool:
    """An op that writes into its first argument (``x.add_(v)``, ``x += v``)."""
    return (node.op == 'call_method' and node.target.endswith('_') and not node.target.startswith('__')) or (
        node.op == 'call_function' and node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv))


def is_creation(node: fx.Node) -> bool:
    """A static method (shape queries, ``x.new_empty(shape)``) or a ``*_like`` tensor factory."""
    return (node.op == 'call_method' and node.target in _STATIC_METHODS) or (
        node.op == 'call_function' and (node.target is getattr or node.target in _CREATION_FUNCTIONS))


def is_filter(node: fx.Node) -> bool:
    """A functional convolution or linear map (its weight is an argument)."""
    return node.op == 'call_function' and node.target in _FILTERS


def filter_args(node: fx.Node) -> Tuple[Any, Any]:
    """The weight and bias arguments of a functional convolution / linear map (None if absent)."""
    args = dict(zip(('input', 'weight', 'bias'), node.args), **node.kwargs)
    return args.get('weight'), args.get('bias')


_POOL_PARAMS = {
    F.max_pool1d: ('input', 'kernel_size', 'stride', 'padding', 'dilation', 'ceil_mode', 'return_indices'),
    F.adaptive_max_pool1d: ('input', 'output_size', 'return_indices'),
}
_POOL_PARAMS.update({F.max_pool2d: _POOL_PARAMS[F.max_pool1d], torch.max_pool2d: _POOL_PARAMS[F.max_pool1d],
                     F.adaptive_max_pool2d: _POOL_PARAMS[F.adaptive_max_pool1d]})


def pool_arguments(node: fx.Node) -> Tuple[Dict[str, Any], Optional[str]]:
    """Keyword arguments of the average pool equivalent to a functional max-pool node, or the reason
    there is none."""
    args = dict(zip(_POOL_PARAMS[node.target], node.args), **node.kwargs)
    if args.pop('return_indices', False):
        return args, 'max-pool indices have no average-pool equivalent'
    dilation = args.pop('dilation', 1)
    if any(d != 1 for d in (tuple(dilation) if isinstance(dilation, (tuple, list)) else (dilation,))):
        return args, 'a dilated max-pool has no average-pool equivalent'
    return args, None
