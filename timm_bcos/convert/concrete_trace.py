"""Tracing at an example input, for forwards that torch.fx cannot trace symbolically.

Many transformer forwards branch on shapes (``if H % window: pad``), loop over a list of inputs or
pass ints between modules; fx's symbolic tracer cannot decide such control flow. `ConcreteTracer`
runs every traced operation on the module's real input from one forward of the model at its
input size (`record_examples`) while it records the graph, so Python control flow sees real
values. The graph is then specialised to that input size: shapes that the forward computed in
Python are constants in it, and the converted module runs at that size (an input of another size
fails loudly in a reshape, as the traced code does not exist for it).
"""
from __future__ import annotations

import contextlib

from typing import Any, Dict, Iterator, Tuple

import torch.fx._symbolic_trace
import torch.utils._pytree

import torch
from torch import Tensor, fx, nn

__all__ = ['ConcreteTracer', 'Example', 'record_examples']

# fx's own switch for running real code while it traces (its patches of nn.Module reverted).
_untraced = getattr(torch.fx._symbolic_trace, '_maybe_revert_all_patches', contextlib.nullcontext)

Example = Tuple[Tuple[Any, ...], Dict[str, Any]]  # a module's positional and keyword inputs


@torch.no_grad()
def record_examples(model: nn.Module, x: Tensor) -> Dict[str, Example]:
    """Each module's inputs at its first call in ``model(x)`` (eval mode), by module path."""
    examples: Dict[str, Example] = {}
    handles = []
    for path, module in model.named_modules():
        def hook(_m, args, kwargs, path=path):
            examples.setdefault(path, (args, kwargs))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return examples


# Attributes of a traced tensor that are constants of the graph (``torch.autocast(x.device.type)``).
_CONSTANT_ATTRIBUTES = ('device', 'dtype', 'layout', 'is_cuda')


class _ConcreteProxy(fx.Proxy):
    """A proxy that knows its value: lengths, ints (from shapes), devices and dtypes are concrete."""

    def __getattr__(self, name: str) -> Any:
        if name in _CONSTANT_ATTRIBUTES:
            return getattr(self.tracer.value(self), name)
        return super().__getattr__(name)

    def __len__(self) -> int:
        return len(self.tracer.value(self))

    def __int__(self) -> int:
        return int(self.tracer.value(self))

    def __index__(self) -> int:
        return int(self.tracer.value(self))


# Functions and methods that take sizes: `torch.ones(n, 4)` or `buffer.expand(n, -1)` of a plain tensor
# with a traced int `n` fail in torch's argument parser before fx sees the proxy, so while tracing
# they are recorded by hand (the size stays a graph value: other batch sizes still run).
_FACTORIES = ('arange', 'empty', 'eye', 'full', 'linspace', 'ones', 'rand', 'randint', 'randn', 'zeros')
_SIZE_METHODS = ('expand', 'new_empty', 'new_full', 'new_ones', 'new_zeros', 'repeat', 'reshape', 'view')


@contextlib.contextmanager
def _traced_size_arguments(tracer: fx.Tracer) -> Iterator[None]:
    def has_proxy(args, kwargs) -> bool:
        return any(isinstance(a, fx.Proxy) for a in torch.utils._pytree.tree_leaves((args, kwargs)))

    def factory(fn):
        def record(*args, **kwargs):
            if has_proxy(args, kwargs):
                return tracer.create_proxy('call_function', fn, args, kwargs)
            return fn(*args, **kwargs)
        return record

    def method(name, fn):
        def record(self, *args, **kwargs):
            if has_proxy(args, kwargs):
                return tracer.create_proxy('call_method', name, (self,) + args, kwargs)
            return fn(self, *args, **kwargs)
        return record
    originals = [(torch, name, getattr(torch, name)) for name in _FACTORIES]
    originals += [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in _SIZE_METHODS]
    try:
        for owner, name, fn in originals:
            setattr(owner, name, factory(fn) if owner is torch else method(name, fn))
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


class ConcreteTracer(fx.Tracer):
    """Trace `root`'s forward (its children are leaves) while running it on `example`."""

    def __init__(self, root: nn.Module, inputs: Dict[str, Any], autowrap_functions: Tuple = ()) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        self._root = root
        self._inputs = inputs  # the forward's arguments by name
        self._values: Dict[fx.Node, Any] = {}

    def trace(self, root, concrete_args=None) -> fx.Graph:
        with _traced_size_arguments(self):
            return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self._root

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def value(self, obj: Any) -> Any:
        return fx.node.map_aggregate(obj, lambda a: self._values[a.node] if isinstance(a, fx.Proxy) else a)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        with _untraced():  # fx's patches of Module.__call__ / __getattr__ off: real computation
            value = self._run(kind, target, self.value(args), self.value(kwargs))
        if value is None and kind != 'placeholder':  # e.g. a module's `mask=None` output: `is None` must see it
            return None
        self._values[proxy.node] = value
        return proxy

    def _run(self, kind: str, target: Any, args, kwargs) -> Any:
        if kind == 'placeholder':
            return self._placeholder(target.lstrip('*'))
        if kind == 'get_attr':
            owner, _, name = target.rpartition('.')
            return getattr(self._root.get_submodule(owner), name)
        if kind == 'call_function':
            return target(*args, **kwargs)
        if kind == 'call_method':
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == 'call_module':
            return self._root.get_submodule(target)(*args, **kwargs)
        return None

    def _placeholder(self, name: str) -> Any:
        """An input by name; fx names the leaves of a fixed (concrete) input ``<name>_<k>``, k from 1."""
        if name in self._inputs:
            return self._inputs[name]
        base, _, k = name.rpartition('_')
        if base in self._inputs and k.isdigit():
            leaves, _ = torch.utils._pytree.tree_flatten(self._inputs[base])
            return leaves[int(k) - 1] if int(k) <= len(leaves) else None
        return None

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.value(obj))

    def iter(self, obj: fx.Proxy) -> Iterator:
        return iter([obj[i] for i in range(len(self.value(obj)))])

    def keys(self, obj: fx.Proxy) -> Any:
        return self.value(obj).keys()
