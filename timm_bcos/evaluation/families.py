"""Which timm models the family survey converts, and which of them are attention models.

A family is a module of ``timm.models`` (``timm.list_modules()``, timm's own); its representative is its
smallest model by parameter count at 10 classes, counted on the meta device (no memory, no init).

Attention criterion (derived, not a hand list): a model is an attention model if one forward of
the original timm model (one noise image at its default input size) computes a contraction --
``@`` / matmul, bmm, baddbmm, mm, einsum, ``F.scaled_dot_product_attention`` or
``F.multi_head_attention_forward`` -- of two tensors that both depend on the input, or holds an
``nn.MultiheadAttention``. Input dependence is what autograd tracks: the input requires grad, the
parameters do not. A product with a weight (``x @ self.weight``) or an elementwise gate (squeeze-
excite's ``x * g(x)``) is not attention; dot products between features (``q @ k``) are.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ['ATTENTION_CRITERION', 'CONTRACTIONS', 'FamilyModel', 'attention_evidence', 'family_of',
           'smallest_per_family', 'timm_families']

CONTRACTIONS = frozenset({'matmul', '__matmul__', '__rmatmul__', 'bmm', 'baddbmm', 'addbmm', 'mm', 'einsum',
                          'scaled_dot_product_attention', 'multi_head_attention_forward'})
ATTENTION_CRITERION = (
    'attention = one forward of the original timm model (a noise image at its default size) computes a '
    'contraction (`@`/matmul, bmm, baddbmm, mm, einsum, `F.scaled_dot_product_attention`, '
    '`F.multi_head_attention_forward`) of two tensors that both depend on the input (autograd: the input '
    'requires grad, the parameters do not), or the model holds an `nn.MultiheadAttention`; every other '
    'model is in the CNN group (MLP / LSTM token mixers and elementwise gates included)')


@dataclass(frozen=True)
class FamilyModel:
    """A family's representative: its timm module, model name and parameter count (10 classes)."""
    family: str
    model: str
    params: int


def family_of(name: str) -> str:
    """The timm module (family) that defines model `name`, e.g. 'resnet' for 'resnet18'."""
    import timm

    return timm.models.model_entrypoint(name).__module__.rsplit('.', 1)[-1]


def _meta_params(name: str) -> int:
    """Parameters of the 10-class model `name`; a ValueError if it is not a classifier (an encoder
    such as Gemma4-ViT's ``*_enc`` ignores ``num_classes``: it has no logits to explain)."""
    import timm

    with warnings.catch_warnings(), torch.device('meta'):
        warnings.simplefilter('ignore')
        model = timm.create_model(name, num_classes=10)
    if getattr(model, 'num_classes', 10) != 10:
        raise ValueError(f'not a classifier: num_classes={model.num_classes} after create_model(num_classes=10)')
    return sum(p.numel() for p in model.parameters())


def timm_families() -> List[str]:
    """timm's own model families: ``timm.list_modules()`` without modules registered from outside
    timm (this package's ``bcos_*`` models are B-cos networks already)."""
    import timm

    return [f for f in timm.list_modules()
            if timm.models.model_entrypoint(timm.list_models(module=f)[0]).__module__.startswith('timm.models.')]


def smallest_per_family(families: Optional[Sequence[str]] = None, progress: bool = True
                        ) -> Tuple[List[FamilyModel], Dict[str, str]]:
    """The smallest classifier of each family (all of `timm_families` by default), ties broken by name.
    Returns the representatives and, by model name, why a model was skipped: it could not be built
    on the meta device, or it is not a classifier."""
    import timm
    from tqdm import tqdm

    known = timm_families()
    unknown = sorted(set(families or ()) - set(known))
    if unknown:
        raise ValueError(f'not timm model families (timm_families()): {", ".join(unknown)}')
    names = [(f, n) for f in (families or known) for n in timm.list_models(module=f)]
    best: Dict[str, FamilyModel] = {}
    skipped: Dict[str, str] = {}
    for family, name in tqdm(names, unit='model', desc='counting parameters (meta)', disable=not progress):
        try:
            params = _meta_params(name)
        except Exception as e:  # reported: a model that cannot be built without memory, or no classifier
            skipped[name] = f'{type(e).__name__}: {" ".join(str(e).split())[:200]}'
            continue
        if family not in best or (params, name) < (best[family].params, best[family].model):
            best[family] = FamilyModel(family, name, params)
    return [best[f] for f in (families or known) if f in best], skipped


class _ContractionRecorder(TorchFunctionMode):
    """Records the first contraction whose operands include two input-dependent tensors."""

    def __init__(self, where: List[str]) -> None:
        super().__init__()
        self.where = where
        self.found: Optional[str] = None

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (), kwargs: Optional[dict] = None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', '')
        if self.found is None and name in CONTRACTIONS and _input_dependent(args, kwargs) >= 2:
            self.found = f'{name} in {self.where[-1] if self.where else "<root>"}'
        return func(*args, **kwargs)


def _input_dependent(args: Iterable, kwargs: Dict[str, Any]) -> int:
    """How many tensor operands (lists and tuples opened) carry autograd history of the input."""
    stack, count = [*args, *kwargs.values()], 0
    while stack:
        a = stack.pop()
        if isinstance(a, (list, tuple)):
            stack.extend(a)
        elif isinstance(a, Tensor) and a.requires_grad:
            count += 1
    return count


def _module_stack(model: nn.Module, where: List[str]) -> List[torch.utils.hooks.RemovableHandle]:
    """Hooks that keep `where[-1]` the path of the module running now."""
    def enter(path: str) -> None:
        where.append(path or '<root>')

    def leave() -> None:
        if where:
            where.pop()

    handles = []
    for path, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda m, a, path=path: enter(path)))
        handles.append(m.register_forward_hook(lambda m, a, o: leave()))
    return handles


def attention_evidence(model: nn.Module, input_size: Sequence[int]) -> Optional[str]:
    """Why `model` (an unconverted network taking `input_size` = (C, H, W)) is an attention model
    under `ATTENTION_CRITERION`, e.g. 'scaled_dot_product_attention in blocks.0.attn'; None if it is not.
    The model runs once in eval mode on one seeded noise image; its parameters are left as they were."""
    mha = next((p for p, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)), None)
    if mha is not None:
        return f'nn.MultiheadAttention at {mha or "<root>"}'
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    where: List[str] = []
    handles = _module_stack(model, where)
    recorder = _ContractionRecorder(where)
    x = torch.rand(1, *input_size, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad(), recorder, warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model(x * 1.0)  # a non-leaf: in-place ops on the input stay legal
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return recorder.found
