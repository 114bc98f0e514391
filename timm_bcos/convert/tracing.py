"""torch.fx tracing of one module's own forward for the fx pass (paper §3.3).

Each forward is traced with its direct submodules as leaves. A forward whose signature says its
input is a list (or tuple, sequence) of tensors (``SelecSlsBlock``: ``x[0]``, ``x[1]``), which fx
cannot trace with one symbolic input, is also traced with a list of symbolic tensors, once per
length that traces: the analysis then covers every form of the input.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from torch import fx, nn

from .graph_ops import TIMM_ACTIVATION_FUNCTIONS, timm_functions

__all__ = ['LIST_LENGTHS', 'Trace', 'trace_forward', 'trace_forwards']

# The list lengths tried for a forward that takes a list input.
LIST_LENGTHS = (1, 2, 3, 4)


class _Tracer(fx.Tracer):
    """Trace one module's own forward: every submodule is a leaf (converted by the module rules).

    `root` is optional because fx re-creates the tracer without arguments when it unpickles a
    rewritten forward's graph (every module is then a leaf).
    """

    def __init__(self, root: Optional[nn.Module] = None) -> None:
        from timm.layers import get_notrace_functions
        autowrap = tuple(f for f in get_notrace_functions() if callable(f)) + timm_functions(
            *TIMM_ACTIVATION_FUNCTIONS)
        super().__init__(autowrap_functions=autowrap)
        self._root = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self._root


def _concrete_args(fn: Callable) -> Dict[str, Any]:
    """Optional flags and inputs of a forward (``pre_logits=False``, ``children=None``) are traced at
    their defaults: fx cannot branch on a symbolic value."""
    params = list(inspect.signature(fn).parameters.values())[2:]  # after self and the input
    return {p.name: p.default for p in params if p.default is None or isinstance(p.default, bool)}


Trace = Tuple[fx.Graph, Set[str]]  # a graph and the names of the arguments it was specialised on


def _method_function(module: nn.Module, method: str) -> Callable:
    """The function `module.<method>` runs: an instance's own (fasternet's ``self.forward =
    self.forward_slicing``) or its class's."""
    own = getattr(vars(module).get(method), '__func__', None)
    return own if own is not None else getattr(type(module), method)


def _first_input(fn: Callable) -> Optional[inspect.Parameter]:
    params = list(inspect.signature(fn).parameters.values())
    return params[1] if len(params) > 1 else None


def _takes_list(fn: Callable) -> bool:
    """Whether the forward's first input is annotated as a list, tuple or sequence of tensors."""
    first = _first_input(fn)
    annotation = str(first.annotation) if first is not None else ''
    return any(word in annotation for word in ('List', 'list', 'Tuple', 'tuple', 'Sequence'))


def trace_forward(module: nn.Module, training: bool, method: str = 'forward',
                  list_length: Optional[int] = None) -> Trace:
    """Trace `module.<method>` in train or eval mode (its first input a list of `list_length`
    tensors if given); returns the graph and the specialised arguments."""
    cls, was = type(module), module.training
    fn = _method_function(module, method)
    concrete = _concrete_args(fn)
    specialised = set(concrete)
    if list_length is not None:
        concrete[_first_input(fn).name] = [fx.PH] * list_length
    module.train(training)
    if fn is not cls.forward:  # fx traces type(root).forward: trace the method through a subclass
        module.__class__ = type(cls.__name__, (cls,), {'forward': fn})
    try:
        return _Tracer(module).trace(module, concrete_args=concrete or None), specialised
    finally:
        module.__class__ = cls
        module.train(was)


def trace_forwards(module: nn.Module, training: bool, method: str = 'forward') -> Tuple[List[Trace], bool]:
    """The traces of a forward: with a tensor input and, if its signature says the input is a
    list, with a list of each length of `LIST_LENGTHS` (all that trace). Returns them and whether
    there are list traces; raises the tensor trace's error if nothing traces."""
    traces, error = [], None
    try:
        traces.append(trace_forward(module, training, method))
    except Exception as e:
        error = e
    lists = []
    if _takes_list(_method_function(module, method)):
        for length in LIST_LENGTHS:
            try:
                lists.append(trace_forward(module, training, method, length))
            except Exception:
                continue
    if not traces + lists:
        raise error
    return traces + lists, bool(lists)
