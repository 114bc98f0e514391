"""What loading the reference implementations' checkpoints (B-cos v1 and v2) have in common.

Both keep a B-cos conv's weight in a child ``linear`` (``<conv>.linear.weight``), order MaxOut units
``o * M + m``, put the classifier as a 1x1 conv before global pooling, and build VGG with a 7x7
head conv padded by 3. Their mappers (`timm_bcos.weights.v1`, `.v2`) rename keys to ours with the
pieces here and validate strictly: every key used, every model key provided, equal shapes.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple, Type

from torch import Tensor, nn

from ..layers import BcosConv2d, BcosLinear, from_reference_layout
from ..models.builder import CheckpointMismatchError

__all__ = ['LINEAR_SUFFIX', 'VGG_HEAD_RENAMES', 'StateDictMismatchError', 'check_tensor_dict', 'class_count_hint',
           'classifier_key', 'compare_mapped_keys', 'has_reference_vgg_head', 'list_keys', 'mismatch_message',
           'model_family', 'prepare_vgg_head', 'rename_keys', 'rename_reference_keys', 'strip_linear', 'to_our_layout']

#: v1/v2's BcosConv2d keeps its weight in a NormedConv2d child ``linear``.
LINEAR_SUFFIX = '.linear.weight'
#: The VGG head of v1/v2 (``classifier.0/1/2``, convs) -> timm's ``pre_logits.fc1/fc2`` and our conv classifier.
VGG_HEAD_RENAMES = {'classifier.0.weight': 'pre_logits.fc1.weight', 'classifier.1.weight': 'pre_logits.fc2.weight',
                    'classifier.2.weight': 'head.fc.fc.weight'}


class StateDictMismatchError(CheckpointMismatchError, ValueError):
    """A reference implementation's (B-cos v1/v2) state dict that does not fit the model: names
    every unexpected, missing and mis-shaped key (after renaming to our keys)."""

    def __init__(self, message: str, unexpected: Sequence[str] = (), missing: Sequence[str] = (),
                 mismatched: Sequence[str] = ()) -> None:
        self.unexpected, self.missing, self.mismatched = list(unexpected), list(missing), list(mismatched)
        super().__init__(message)


def list_keys(what: str, items: Sequence[str], limit: int = 8) -> str:
    """``'3 missing keys: a, b, c'``, the first `limit` items and a count of the rest."""
    more = f' ... (+{len(items) - limit} more)' if len(items) > limit else ''
    return f'{len(items)} {what}: {", ".join(items[:limit])}{more}'


def check_tensor_dict(state_dict, error: Type[StateDictMismatchError]) -> None:
    """Raise `error` unless `state_dict` is a dict of tensors (a whole training checkpoint is not)."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise error(f'expected a state dict of tensors, got {type(state_dict).__name__}'
                    + (f' with keys {list(state_dict)[:5]}' if isinstance(state_dict, dict) else '')
                    + ' (a training checkpoint? pass its model state dict)')


def model_family(model: nn.Module, families: Sequence[str], error: Type[StateDictMismatchError], known: str) -> str:
    """Which of `families` ('resnet', 'densenet', 'vgg', 'inception', 'simple') `model` is; else `error`
    saying for which models (`known`) the checkpoints exist."""
    from timm.models.densenet import DenseNet
    from timm.models.inception_v3 import InceptionV3
    from timm.models.resnet import ResNet
    from timm.models.vgg import VGG

    from ..models.simple_cifar import BcosSimpleNet

    classes = dict(resnet=ResNet, densenet=DenseNet, vgg=VGG, inception=InceptionV3, simple=BcosSimpleNet)
    family = next((f for f in families if isinstance(model, classes[f])), None)
    if family is None:
        raise error(f'{known} only, got {type(model).__name__}')
    return family


def has_reference_vgg_head(model: nn.Module) -> bool:
    """True if a timm VGG has v1/v2's head (`prepare_vgg_head`)."""
    mlp = model.pre_logits
    return tuple(mlp.fc1.padding) == (3, 3) and mlp.input_kernel_size == 1


def prepare_vgg_head(model: nn.Module) -> nn.Module:
    """Give timm's VGG the head of v1's ``models/bcos/vgg.py`` and v2's ``BcosVGG`` (before `convert_to_bcos`).

    Theirs: ``BcosConv2d(512, 4096, 7, padding=3) -> BcosConv2d(4096, 4096, 1) -> BcosConv2d(4096, C, 1)
    -> global average pool``. timm: ``ConvMlp.fc1`` is a 7x7 conv *without* padding (a 7x7 map
    becomes 1x1) and maps smaller than 7x7 are first upsampled by adaptive average pooling. Setting
    ``fc1.padding = 3`` and ``input_kernel_size = 1`` (no upsampling) makes them the same function
    at every input size. The conv biases of timm's head are dropped by the conversion, as theirs has none.
    """
    mlp = getattr(model, 'pre_logits', None)
    fc1 = getattr(mlp, 'fc1', None)
    if not isinstance(fc1, nn.Conv2d) or not hasattr(mlp, 'input_kernel_size'):
        raise TypeError(f'prepare_vgg_head expects a timm VGG (pre_logits=ConvMlp), got {type(model).__name__}')
    if isinstance(fc1.padding, str) or fc1.padding_mode != 'zeros' or fc1.kernel_size != (7, 7):
        raise ValueError(f'unexpected VGG head conv {fc1}')
    fc1.padding = (3, 3)
    mlp.input_kernel_size = 1
    return model


def strip_linear(key: str) -> str:
    """``<conv>.linear.weight`` (v1/v2) -> ``<conv>.weight`` (ours); other keys unchanged."""
    return key[:-len(LINEAR_SUFFIX)] + '.weight' if key.endswith(LINEAR_SUFFIX) else key


def classifier_key(family: str, model: nn.Module) -> str:
    """Our key of the classifier weight: the conv classifier (`BcosConvClassifier.fc`) of a converted model."""
    if family == 'simple':
        return 'classifier.weight'
    if family == 'vgg':
        return VGG_HEAD_RENAMES['classifier.2.weight']
    return f'{model.bcos_cfg["classifier"]}.fc.weight'


def _head_renames(family: str, model: nn.Module) -> Dict[str, str]:
    """Reference head keys (``.linear`` stripped) -> ours: VGG's three head convs, else the classifier
    conv ``fc``/``classifier`` -> ``fc.fc``/``classifier.fc`` (our `BcosConvClassifier`)."""
    if family == 'vgg':
        return dict(VGG_HEAD_RENAMES)
    path = model.bcos_cfg['classifier']
    return {f'{path}.weight': f'{path}.fc.weight'}


def _vgg_feature_renames(shapes: Dict[str, Tuple[int, ...]], model: nn.Module) -> Dict[int, int]:
    """Reference ``features.i`` -> timm ``features.j``: the modules with weights, paired in order.

    `shapes`: the reference keys (``.linear`` already stripped) and shapes. v1/v2 have a conv (and
    a norm) per conv layer and a pool per 'M', timm a conv, norm, activation and a pool, so the
    indices differ. Pairs stop at the first conv/norm kind mismatch; the rest stays unmapped and is
    reported by the key check.
    """
    pattern = re.compile(r'^features\.(\d+)\.')
    theirs = sorted({int(m.group(1)) for k in shapes for m in [pattern.match(k)] if m})
    ours = [int(n) for n, m in model.features.named_children() if next(m.parameters(), None) is not None]
    mapping = {}
    for i, j in zip(theirs, ours):
        kind_theirs = 'conv' if len(shapes.get(f'features.{i}.weight', ())) == 4 else 'norm'
        kind_ours = 'conv' if isinstance(model.features[j], BcosConv2d) else 'norm'
        if kind_theirs != kind_ours:
            break
        mapping[i] = j
    return mapping


def rename_reference_keys(shapes: Dict[str, Tuple[int, ...]], family: str, model: nn.Module) -> Dict[str, str]:
    """Reference keys (``.linear`` already stripped, with their shapes) -> ours: the head
    (`_head_renames`) and, for VGG, the feature indices (`_vgg_feature_renames`); every other key
    is the same in both."""
    head = _head_renames(family, model)
    renumber = _vgg_feature_renames(shapes, model) if family == 'vgg' else {}
    names = {}
    for key in shapes:
        new = head.get(key, key)
        m = re.match(r'^features\.(\d+)\.(.*)$', new)
        if m and int(m.group(1)) in renumber:
            new = f'features.{renumber[int(m.group(1))]}.{m.group(2)}'
        names[key] = new
    return names


def rename_keys(state_dict: Dict[str, Tensor], names: Dict[str, str],
                error: Type[StateDictMismatchError]) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """``(mapped, sources)``: the tensors under our keys (``names[checkpoint key]``) and, per our key,
    the checkpoint key it came from; two checkpoint keys with one name raise `error`."""
    mapped: Dict[str, Tensor] = {}
    sources: Dict[str, str] = {}
    for source, key in names.items():
        if key in mapped:
            raise error(f'checkpoint keys {sources[key]!r} and {source!r} both map to {key!r}')
        mapped[key], sources[key] = state_dict[source], source
    return mapped, sources


def compare_mapped_keys(
        mapped: Dict[str, Tensor],
        sources: Dict[str, str],
        expected: Dict[str, Tuple[int, ...]],
        head_key: str,
        allow_new_head: bool,
) -> Tuple[List[str], List[str], List[str]]:
    """A renamed reference state dict (`mapped`, from checkpoint keys `sources`) against the model's
    shapes: the unexpected, missing and mis-shaped keys. With `allow_new_head`, a classifier of
    another class count (same input width) is dropped from `mapped` first (fine-tuning)."""
    new_head = (allow_new_head and head_key in mapped and head_key in expected
                and tuple(mapped[head_key].shape)[1:] == expected[head_key][1:]
                and tuple(mapped[head_key].shape) != expected[head_key])
    if new_head:
        del mapped[head_key]
    unexpected = sorted(set(mapped) - set(expected))
    missing = sorted(set(expected) - set(mapped) - ({head_key} if new_head else set()))
    mismatched = [f'{k} (checkpoint {sources[k]!r}): {tuple(mapped[k].shape)} vs model {expected[k]}'
                  for k in mapped if k in expected and tuple(mapped[k].shape) != expected[k]]
    return unexpected, missing, mismatched


def to_our_layout(mapped: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Reorder the MaxOut units of every B-cos weight from the reference order ``o * M + m`` to ours
    (`from_reference_layout`), in place; other tensors are kept as they are."""
    modules = dict(model.named_modules())
    for k in list(mapped):
        owner = modules.get(k.rpartition('.')[0])
        if isinstance(owner, (BcosConv2d, BcosLinear)) and owner.max_out > 1 and k.endswith('.weight'):
            mapped[k] = from_reference_layout(mapped[k], owner.max_out, getattr(owner, 'groups', 1))
    return mapped


def class_count_hint(state_dict: Dict[str, Tensor], sources: Dict[str, str], expected: Dict[str, Tuple[int, ...]],
                     head_key: str, max_out: int) -> Optional[str]:
    """How to fit a checkpoint with another class count, if that is the mismatch."""
    if head_key not in sources or head_key not in expected:
        return None
    c_ckpt, c_model = state_dict[sources[head_key]].shape[0] // max_out, expected[head_key][0] // max_out
    if c_ckpt == c_model:
        return None
    return (f'the checkpoint has {c_ckpt} classes, the model {c_model}: build it with num_classes={c_ckpt}, or '
            f'pass allow_new_head=True to fine-tune a new classifier')


def mismatch_message(title: str, unexpected: Sequence[str], missing: Sequence[str], mismatched: Sequence[str],
                     hints: Sequence[Optional[str]]) -> str:
    """``'<title>: 2 unexpected keys: ...; 1 missing keys: .... <hints>.'``"""
    parts = [list_keys(what, items) for what, items in (('unexpected keys', unexpected), ('missing keys', missing),
                                                       ('shape mismatches', mismatched)) if items]
    hints = [h for h in hints if h]
    return f'{title}: ' + '; '.join(parts) + ('. ' + '; '.join(hints) if hints else '') + '.'
