"""torch.fx tracing of one module's own forward for the fx pass (paper §3.3).

Each forward is traced with its direct submodules as leaves. A forward whose signature says its
input is a list (or tuple, sequence) of tensors (``SelecSlsBlock``: ``x[0]``, ``x[1]``), which fx
cannot trace with one symbolic input, is also traced with a list of symbolic tensors, once per
length that traces: the analysis then covers every form of the input.

Structurally identical modules (a network's 58 DenseLayers) have the same traces: `TraceCache`
traces each structure once per mode (fx's tracer costs ~20 ms a call, whatever the module).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Set, Tuple

import torch
from torch import fx, nn

from .concrete_trace import ConcreteTracer, Example
from .graph_ops import TIMM_ACTIVATION_FUNCTIONS, timm_functions

__all__ = ['LIST_LENGTHS', 'MAX_OPTIONAL_GRAPHS', 'Trace', 'TraceCache', 'concrete_args', 'method_function',
           'trace_concrete', 'trace_forward', 'trace_forwards']

# The list lengths tried for a forward that takes a list input.
LIST_LENGTHS = (1, 2, 3, 4)
# Graphs traced with some optional ``=None`` inputs given, at most (each subset, smallest first).
MAX_OPTIONAL_GRAPHS = 7


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
        self.autowrap = autowrap
        self._root = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self._root


def concrete_args(fn: Callable) -> Dict[str, Any]:
    """Optional flags and inputs of a forward (``pre_logits=False``, ``children=None``) are traced at
    their defaults: fx cannot branch on a symbolic value."""
    params = list(inspect.signature(fn).parameters.values())[2:]  # after self and the input
    return {p.name: p.default for p in params if p.default is None or isinstance(p.default, bool)}


Trace = Tuple[fx.Graph, Set[str]]  # a graph and the names of the arguments it was specialised on


def method_function(module: nn.Module, method: str) -> Callable:
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


@contextlib.contextmanager
def _tracing(module: nn.Module, training: bool, method: str) -> Iterator[Callable]:
    """`module` in train or eval mode, with `method` as its class's forward (fx traces
    ``type(root).forward``: another method is traced through a subclass); yields the method's
    function. Both are restored afterwards."""
    cls, was = type(module), module.training
    fn = method_function(module, method)
    module.train(training)
    if fn is not cls.forward:
        module.__class__ = type(cls.__name__, (cls,), {'forward': fn})
    try:
        yield fn
    finally:
        module.__class__ = cls
        module.train(was)


def trace_forward(module: nn.Module, training: bool, method: str = 'forward',
                  list_length: Optional[int] = None, given: Tuple[str, ...] = ()) -> Trace:
    """Trace `module.<method>` in train or eval mode (its first input a list of `list_length`
    tensors if given; the optional ``=None`` inputs named in `given` as tensors); returns the
    graph and the specialised arguments."""
    with _tracing(module, training, method) as fn:
        concrete = {k: v for k, v in concrete_args(fn).items() if k not in given}
        specialised = set(concrete)
        if list_length is not None:
            concrete[_first_input(fn).name] = [fx.PH] * list_length
        return _Tracer(module).trace(module, concrete_args=concrete or None), specialised


def trace_forwards(module: nn.Module, training: bool, method: str = 'forward') -> Tuple[List[Trace], bool]:
    """The traces of a forward: with a tensor input (its optional ``=None`` inputs left out, and
    each subset of them given), and, if its signature says the input is a list, with a list of each length of
    `LIST_LENGTHS` (all that trace). Returns them and whether
    there are list traces; raises the tensor trace's error if nothing traces."""
    traces, error = [], None
    try:
        traces.append(trace_forward(module, training, method))
    except Exception as e:
        error = e
    optional = [k for k, v in concrete_args(method_function(module, method)).items() if v is None]
    subsets = [c for r in range(1, len(optional) + 1) for c in itertools.combinations(optional, r)]
    for given in subsets[:MAX_OPTIONAL_GRAPHS] if traces else ():
        try:  # optional tensor inputs (a mask, rotary embeddings) given: their own graph
            traces.append(trace_forward(module, training, method, given=given))
        except Exception:
            pass
    lists = []
    if _takes_list(method_function(module, method)):
        for length in LIST_LENGTHS:
            try:
                lists.append(trace_forward(module, training, method, length))
            except Exception:
                continue
    if not traces + lists:
        raise error
    return traces + lists, bool(lists)


_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {'training'}  # parameter / buffer / child / hook dicts


def _value_key(value: Any) -> Hashable:
    """What a traced forward can see of an attribute value: constants by value, tensors by shape and
    dtype, anything else by identity (never shared by two modules unless it is the same object)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(_value_key(v) for v in value)
    if isinstance(value, torch.Tensor):
        return 'tensor', tuple(value.shape), value.dtype
    return 'id', id(value)


def structure_key(module: nn.Module, detailed: Callable[[nn.Module], bool] = lambda m: False) -> Hashable:
    """What a module's own forward, traced with its children as leaves, depends on: its class,
    attribute values and tensor shapes, and its submodule tree's names, classes and flags (bool /
    str / None attributes). Two modules with the same key trace to the same graph. The sizes
    (channel counts, weight shapes) of the layers the rules replace are left out: a forward calls
    such a layer, it does not read its sizes. A `detailed` child (a custom one, e.g. a relative
    position bias whose window size a forward reads) counts with all its attributes."""
    def own(m: nn.Module, everything: bool) -> Hashable:
        attrs = tuple(sorted((k, _value_key(v)) for k, v in vars(m).items() if k not in _MODULE_INTERNALS and (
            everything or v is None or isinstance(v, (bool, str)))))
        tensors = tuple((k, _value_key(t) if everything else t is None)
                        for k, t in (*m._parameters.items(), *m._buffers.items()))
        return type(m), attrs, tensors, tuple(m._modules)

    return tuple((name, own(m, not name or ('.' not in name and detailed(m))))
                 for name, m in module.named_modules(remove_duplicate=False))


def _holds_tensor(value: Any) -> bool:
    found = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, torch.Tensor) else None)
    return bool(found)


def trace_concrete(module: nn.Module, training: bool, method: str, example: Example) -> Trace:
    """Trace `module.<method>` by running it on `example` (`ConcreteTracer`): the graph of the
    control flow taken at that input. Optional inputs left at their defaults in the example are
    specialised (a call that gives them has no graph)."""
    with _tracing(module, training, method) as fn:
        bound = inspect.signature(fn).bind(module, *example[0], **example[1])
        bound.apply_defaults()
        specialised = {k for k, v in concrete_args(fn).items() if bound.arguments.get(k, v) is v}
        # non-tensor inputs are constants of the graph: scalars fixed in it, sizes (tuples) static inputs
        static = {k for k, v in list(bound.arguments.items())[1:] if not _holds_tensor(v)}
        fixed = {k: bound.arguments[k] for k in static if isinstance(bound.arguments[k], (int, float, str, type(None)))}
        tracer = ConcreteTracer(module, dict(bound.arguments), _Tracer().autowrap)
        return tracer.trace(module, concrete_args=fixed or None), specialised | static


class TraceCache:
    """`trace_forwards` once per module structure (`structure_key` with `detailed` children) and
    mode; each lookup returns a copy of the graphs (the fx pass rewrites them in place). A forward
    fx cannot trace is traced at an example input (`trace_concrete`; not cached: it depends on the
    input size)."""

    def __init__(self, detailed: Callable[[nn.Module], bool] = lambda m: False) -> None:
        self.detailed = detailed
        self._traces: Dict[Hashable, Tuple[List[Trace], bool, nn.Module]] = {}
        self._untraceable: Dict[Hashable, Exception] = {}

    def trace_forwards(self, module: nn.Module, training: bool, method: str = 'forward',
                       example: Optional[Callable[[], Optional[Example]]] = None) -> Tuple[List[Trace], bool]:
        """The traces; tensor constants fx stored on the first module of a structure (``_tensor_constant0``)
        are set on `module` too, which runs the same graphs. `example` gives the module's input for
        `trace_concrete` when fx cannot trace it symbolically."""
        key = (structure_key(module, self.detailed), training, method)
        if key not in self._traces and key not in self._untraceable:
            try:
                self._traces[key] = (*trace_forwards(module, training, method), module)
            except Exception as e:
                self._untraceable[key] = e
        if key in self._untraceable:
            found = example() if example is not None else None
            if found is None:
                raise self._untraceable[key]
            return [trace_concrete(module, training, method, found)], False
        traces, is_list, source = self._traces[key]
        for graph, _ in traces:
            for node in graph.nodes:
                if node.op == 'get_attr' and node.target.startswith('_tensor_constant') and not hasattr(
                        module, node.target):
                    setattr(module, node.target, getattr(source, node.target))
        return [(copy.deepcopy(graph), set(specialised)) for graph, specialised in traces], is_list
