"""Loading the released B-cos v2 ImageNet weights into converted timm models.

B-cos v2 (package ``bcos``, github.com/B-cos/B-cos-v2) hand-copies torchvision's ResNet, DenseNet
and VGG and builds them from ``experiments/ImageNet/bcos_final`` with::

    conv_layer = BcosConv2d(b=2, max_out=1)          # unit-norm weights, no bias, no scale
    norm_layer = NoBias(BatchNormUncentered2d)       # x / sqrt(var + eps) * gamma (no beta)
    activations deleted, stem max-pool -> AvgPool2d(3, 2, 1), VGG 'M' -> AvgPool2d(2, 2)
    classifier = BcosConv2d(C_feat, C, 1) *before* global average pooling
    logits = pooled + logit_bias, logit_bias = -log(1000 - 1), no temperature

``convert_to_bcos(timm_model, b=2, max_out=1, norm='bnu', head='conv')`` gives the same function
for ResNets, ResNeXt and DenseNets, key for key. v2's VGG head differs from timm's: its first
head conv has ``padding=3`` (a 7x7 map stays 7x7, and all positions are averaged after the last
conv) where timm's ``ConvMlp.fc1`` has no padding and first upsamples maps smaller than 7x7.
`create_v2_model` applies that change (`prepare_v2_vgg_head`) before converting.

`map_v2_state_dict` renames a v2 state dict (its ``model.state_dict()``, as in the release
files) to ours and validates it strictly; it can be timm's ``pretrained_filter_fn``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from .pretrained import StateDictMismatchError, compare_mapped_keys, list_keys

__all__ = ['V2_ARCHS', 'V2_BASE_URL', 'V2_CONVERT_KWARGS', 'V2StateDictError', 'create_v2_model',
           'guess_v2_arch', 'load_v2_state_dict', 'map_v2_state_dict', 'prepare_v2_vgg_head']

V2_BASE_URL = 'https://github.com/B-cos/B-cos-v2/releases/download/v0.0.1-weights'

# bcos_final DEFAULTS: bcos_args=dict(b=2, max_out=1), norm_layer=NoBias(BatchNormUncentered2d),
# logit_bias=-log(1000 - 1) (our default -log(C - 1) at C=1000), no logit temperature, 6-channel stem.
V2_CONVERT_KWARGS: Dict[str, Any] = dict(b=2.0, max_out=1, norm='bnu', in_chans=6, head='conv')


def _arch(timm_arch: str, family: str, file: str, top1: float, top5: float, blocks: Tuple, **extra) -> Dict[str, Any]:
    return dict(timm_arch=timm_arch, family=family, convert_kwargs=dict(V2_CONVERT_KWARGS),
                v2_experiment=file.split('-')[0], url=f'{V2_BASE_URL}/{file}', top1=top1, top5=top5,
                num_classes=1000, blocks=blocks, **extra)


# Accuracies: ImageNet val top-1/top-5 (%) from the docstrings of bcos.models.pretrained (README rounds them).
# `blocks` is the architecture signature `guess_v2_arch` reads from a state dict: for ResNets the
# blocks per stage and (bottleneck width, in-channels per group) of layer1.0.conv2; for DenseNets the
# layers per dense block and the stem width; for VGG the number of feature convolutions.
V2_ARCHS: Dict[str, Dict[str, Any]] = {
    'resnet18': _arch('resnet18', 'resnet', 'resnet_18-68b4160fff.pth', 68.736, 87.430, ((2, 2, 2, 2), (64, 64))),
    'resnet34': _arch('resnet34', 'resnet', 'resnet_34-a63425a03e.pth', 72.284, 90.052, ((3, 4, 6, 3), (64, 64))),
    'resnet50': _arch('resnet50', 'resnet', 'resnet_50-ead259efe4.pth', 75.882, 92.064,
                      ((3, 4, 6, 3), (64, 64), 'bottleneck')),
    'resnet101': _arch('resnet101', 'resnet', 'resnet_101-84c3658278.pth', 76.532, 92.538,
                       ((3, 4, 23, 3), (64, 64), 'bottleneck')),
    'resnet152': _arch('resnet152', 'resnet', 'resnet_152-42051a77c1.pth', 76.484, 92.398,
                       ((3, 8, 36, 3), (64, 64), 'bottleneck')),
    'resnext50_32x4d': _arch('resnext50_32x4d', 'resnet', 'resnext_50_32x4d-57af241ab9.pth', 75.820, 91.810,
                             ((3, 4, 6, 3), (128, 4), 'bottleneck')),
    'densenet121': _arch('densenet121', 'densenet', 'densenet_121-b8daf96afb.pth', 73.612, 91.106,
                         ((6, 12, 24, 16), 64)),
    'densenet161': _arch('densenet161', 'densenet', 'densenet_161-9e9ea51353.pth', 76.622, 92.554,
                         ((6, 12, 36, 24), 96)),
    'densenet169': _arch('densenet169', 'densenet', 'densenet_169-7037ee0604.pth', 75.186, 91.786,
                         ((6, 12, 32, 32), 64)),
    'densenet201': _arch('densenet201', 'densenet', 'densenet_201-00ac87066f.pth', 75.480, 91.992,
                         ((6, 12, 48, 32), 64)),
    'vgg11_bnu': _arch('vgg11_bn', 'vgg', 'vgg_11_bnu-34036029f0.pth', 69.310, 88.388, (8,),
                       prepare='prepare_v2_vgg_head',
                       notes="timm's vgg11_bn with pre_logits.fc1 padding=3 and no upsampling to 7x7 "
                             "(v2's head); see prepare_v2_vgg_head"),
}
for _name, _cfg in V2_ARCHS.items():
    _cfg['v2_entrypoint'] = _name  # bcos.models.pretrained.<name>, torch.hub.load('B-cos/B-cos-v2', <name>)


class V2StateDictError(StateDictMismatchError):
    """A B-cos v2 state dict that does not fit the model (see `StateDictMismatchError`)."""


# --- building ----------------------------------------------------------------------------------

def prepare_v2_vgg_head(model: nn.Module) -> nn.Module:
    """Give timm's VGG the head of v2's ``BcosVGG`` (before `convert_to_bcos`).

    v2: ``BcosConv2d(512, 4096, 7, padding=3) -> BcosConv2d(4096, 4096, 1) -> BcosConv2d(4096, C, 1)
    -> global average pool``. timm: ``ConvMlp.fc1`` is a 7x7 conv *without* padding (a 7x7 map
    becomes 1x1) and maps smaller than 7x7 are first upsampled by adaptive average pooling. Setting
    ``fc1.padding = 3`` and ``input_kernel_size = 1`` (no upsampling) makes them the same function
    at every input size. The conv biases of timm's head are dropped by the conversion, as v2 has none.
    """
    mlp = getattr(model, 'pre_logits', None)
    fc1 = getattr(mlp, 'fc1', None)
    if not isinstance(fc1, nn.Conv2d) or not hasattr(mlp, 'input_kernel_size'):
        raise TypeError(f'prepare_v2_vgg_head expects a timm VGG (pre_logits=ConvMlp), got {type(model).__name__}')
    if isinstance(fc1.padding, str) or fc1.padding_mode != 'zeros' or fc1.kernel_size != (7, 7):
        raise ValueError(f'unexpected VGG head conv {fc1}')
    fc1.padding = (3, 3)
    mlp.input_kernel_size = 1
    return model


_PREPARE: Dict[str, Callable[[nn.Module], nn.Module]] = {'prepare_v2_vgg_head': prepare_v2_vgg_head}


def create_v2_model(name: str, num_classes: int = 1000, state_dict: Optional[Dict[str, Tensor]] = None,
                    **timm_kwargs) -> nn.Module:
    """Build the timm model + conversion that reproduces B-cos v2's ``name`` (a key of `V2_ARCHS`).

    ``state_dict``: an optional v2 state dict (e.g. ``torch.load`` of the release file), mapped
    with `map_v2_state_dict` and loaded strictly.
    """
    import timm

    from .convert import convert_to_bcos

    if name not in V2_ARCHS:
        raise KeyError(f'unknown B-cos v2 architecture {name!r}; known: {sorted(V2_ARCHS)}')
    cfg = V2_ARCHS[name]
    model = timm.create_model(cfg['timm_arch'], pretrained=False, num_classes=num_classes, **timm_kwargs)
    if cfg.get('prepare'):
        model = _PREPARE[cfg['prepare']](model)
    convert_to_bcos(model, **cfg['convert_kwargs'])
    if state_dict is not None:
        load_v2_state_dict(model, state_dict)
    return model


def load_v2_state_dict(model: nn.Module, state_dict: Dict[str, Tensor]) -> nn.Module:
    """``model.load_state_dict(map_v2_state_dict(state_dict, model), strict=True)``."""
    model.load_state_dict(map_v2_state_dict(state_dict, model), strict=True)
    return model


# --- key mapping -------------------------------------------------------------------------------

_LINEAR = '.linear.weight'  # v2's BcosConv2d keeps its weight in a NormedConv2d child `linear`


def _family(model: nn.Module) -> str:
    from timm.models.densenet import DenseNet
    from timm.models.resnet import ResNet
    from timm.models.vgg import VGG

    for cls, family in ((ResNet, 'resnet'), (DenseNet, 'densenet'), (VGG, 'vgg')):
        if isinstance(model, cls):
            return family
    raise V2StateDictError(f'B-cos v2 checkpoints exist for timm ResNet/ResNeXt, DenseNet and VGG models only, '
                           f'got {type(model).__name__}')


def _check_model_config(model: nn.Module, family: str) -> None:
    """The model must be converted like v2 (keys alone do not show b or where the classifier sits)."""
    cfg = getattr(model, 'bcos_cfg', None)
    if cfg is None:
        raise V2StateDictError(f'{type(model).__name__} is not a converted B-cos model: call '
                               f'convert_to_bcos(model, **V2_CONVERT_KWARGS) (or create_v2_model) first')
    wrong = {k: cfg.get(k) for k in ('b', 'norm', 'head', 'in_chans') if cfg.get(k) != V2_CONVERT_KWARGS[k]}
    if cfg.get('logit_temperature') is not None:
        wrong['logit_temperature'] = cfg['logit_temperature']
    if wrong:
        raise V2StateDictError(f'the model was converted with {wrong}, B-cos v2 uses '
                               f'{ {k: V2_CONVERT_KWARGS.get(k) for k in wrong} }: convert with '
                               f'convert_to_bcos(model, **V2_CONVERT_KWARGS)')
    if family == 'vgg':
        mlp = model.pre_logits
        if tuple(mlp.fc1.padding) != (3, 3) or mlp.input_kernel_size != 1:
            raise V2StateDictError("v2's VGG head pads its 7x7 conv by 3 and never upsamples: apply "
                                   'prepare_v2_vgg_head(model) before convert_to_bcos (or use create_v2_model)')


def _head_renames(family: str, model: nn.Module) -> Dict[str, str]:
    """v2 head keys (after `.linear` is dropped) -> ours."""
    if family == 'vgg':
        return {'classifier.0.weight': 'pre_logits.fc1.weight', 'classifier.1.weight': 'pre_logits.fc2.weight',
                'classifier.2.weight': 'head.fc.fc.weight'}
    path = model.bcos_cfg['classifier']  # 'fc' (ResNet) / 'classifier' (DenseNet), a BcosConvClassifier
    return {f'{path}.weight': f'{path}.fc.weight'}


def _module_index_order(keys: Iterable[str], prefix: str) -> List[int]:
    pattern = re.compile(rf'^{re.escape(prefix)}(\d+)\.')
    return sorted({int(m.group(1)) for k in keys for m in [pattern.match(k)] if m})


def _vgg_feature_renames(v2_keys: Sequence[str], model: nn.Module) -> Dict[int, int]:
    """v2 ``features.i`` -> timm ``features.j``: the modules with state, paired in order.

    v2 has (conv, norm) per conv and an AvgPool2d per 'M'; timm (conv, norm, act) and a pool, so the
    indices differ. Pairs stop at the first conv/norm kind mismatch; the rest stays unmapped and is
    reported by the validation.
    """
    from .layers import BcosConv2d

    def kind_v2(i: int) -> str:
        return 'conv' if f'features.{i}{_LINEAR}' in v2_keys else 'norm'

    ours = [int(n) for n, m in model.features.named_children() if next(m.parameters(), None) is not None]
    mapping = {}
    for i, j in zip(_module_index_order(v2_keys, 'features.'), ours):
        kind_ours = 'conv' if isinstance(model.features[j], BcosConv2d) else 'norm'
        if kind_v2(i) != kind_ours:
            break
        mapping[i] = j
    return mapping


def _rename(key: str, family: str, head: Dict[str, str], vgg_features: Dict[int, int]) -> str:
    if key.endswith(_LINEAR):
        key = key[:-len(_LINEAR)] + '.weight'
    key = head.get(key, key)
    if family == 'vgg':
        m = re.match(r'^features\.(\d+)\.(.*)$', key)
        if m and int(m.group(1)) in vgg_features:
            key = f'features.{vgg_features[int(m.group(1))]}.{m.group(2)}'
    return key


def _signature(keys_shapes: Dict[str, Tuple[int, ...]], family: str) -> Optional[Tuple]:
    """The architecture signature of a v2 or our state dict (see `V2_ARCHS['...']['blocks']`)."""
    keys = set(keys_shapes)
    if family == 'resnet':
        stages = tuple(len(_module_index_order(keys, f'layer{s}.')) for s in range(1, 5))
        conv2 = next((keys_shapes[k] for k in (f'layer1.0.conv2{_LINEAR}', 'layer1.0.conv2.weight') if k in keys), None)
        if conv2 is None or not all(stages):
            return None
        bottleneck = any(k.startswith('layer1.0.conv3.') for k in keys)
        return (stages, tuple(conv2[:2])) + (('bottleneck',) if bottleneck else ())
    if family == 'densenet':
        blocks = tuple(len(_module_index_order(keys, f'features.denseblock{b}.denselayer')) for b in range(1, 5))
        conv0 = next((keys_shapes[k] for k in (f'features.conv0{_LINEAR}', 'features.conv0.weight') if k in keys), None)
        return (blocks, conv0[0]) if conv0 is not None and all(blocks) else None
    if family == 'vgg':
        convs = [k for k in keys if re.match(r'^features\.\d+\.(linear\.)?weight$', k) and len(keys_shapes[k]) == 4]
        return (len(convs),)
    return None


def guess_v2_arch(state_dict: Dict[str, Tensor]) -> Optional[str]:
    """The `V2_ARCHS` name whose architecture a v2 (or already mapped) state dict has, else None."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for family in ('resnet', 'densenet', 'vgg'):
        sig = _signature(shapes, family)
        if sig is None:
            continue
        for name, cfg in V2_ARCHS.items():
            if cfg['family'] == family and cfg['blocks'] == sig:
                return name
    return None


def map_v2_state_dict(state_dict: Dict[str, Tensor], model: nn.Module, *,
                      allow_new_head: bool = False) -> Dict[str, Tensor]:
    """Rename a B-cos v2 state dict to the keys of `model` (built by `create_v2_model`) and validate it.

    v2 keys ``<conv>.linear.weight`` become ``<conv>.weight`` (same layout; MaxOut units are
    reordered with `from_reference_layout` if the model uses max_out > 1); norm keys (weight,
    running_mean, running_var, num_batches_tracked) are unchanged; the classifier conv
    ``fc``/``classifier`` becomes ``fc.fc``/``classifier.fc`` (our `BcosConvClassifier`); for VGG
    ``classifier.0/1/2`` become ``pre_logits.fc1``/``pre_logits.fc2``/``head.fc.fc`` and
    ``features.i`` are renumbered (timm keeps the removed ReLUs as Identity slots). v2's
    `LogitLayer` has no state. A state dict already in our format (no ``.linear.weight`` keys) is
    only validated.

    Every key must be used and every model key provided, with equal shapes; otherwise
    `V2StateDictError` (a ValueError) lists the unexpected, missing and mis-shaped keys (our names)
    with a hint at the checkpoint's architecture / class count. The returned dict holds the same
    tensor objects (but reordered MaxOut weights). Usable as timm's
    ``pretrained_filter_fn(state_dict, model)``.

    ``allow_new_head=True`` (fine-tuning: the model was built for another class count) drops the
    checkpoint's classifier weight when only its class count differs, so the model keeps its new
    classifier (load with ``strict=False``, or let timm do it); everything else is still strict.
    """
    from .layers import BcosConv2d, from_reference_layout

    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise V2StateDictError(f'expected a state dict of tensors, got {type(state_dict).__name__}'
                               + (f' with keys {list(state_dict)[:5]}' if isinstance(state_dict, dict) else '')
                               + ' (a training checkpoint? pass its model state dict)')
    family = _family(model)
    _check_model_config(model, family)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keys = list(state_dict)
    if any(k.endswith(_LINEAR) for k in keys):
        head = _head_renames(family, model)
        vgg_features = _vgg_feature_renames(keys, model) if family == 'vgg' else {}
        mapped: Dict[str, Tensor] = {}
        sources: Dict[str, str] = {}
        for k in keys:
            new = _rename(k, family, head, vgg_features)
            if new in mapped:
                raise V2StateDictError(f'checkpoint keys {sources[new]!r} and {k!r} both map to {new!r}')
            mapped[new], sources[new] = state_dict[k], k
    else:
        mapped, sources = dict(state_dict), {k: k for k in keys}

    unexpected, missing, mismatched = compare_mapped_keys(mapped, sources, expected, _classifier_key(family, model),
                                                          allow_new_head)
    if unexpected or missing or mismatched:
        raise V2StateDictError(_mismatch_message(state_dict, model, family, unexpected, missing, mismatched,
                                                 sources), unexpected, missing, mismatched)

    modules = dict(model.named_modules())
    for k in list(mapped):
        owner = modules.get(k.rpartition('.')[0])
        if isinstance(owner, BcosConv2d) and owner.max_out > 1 and k.endswith('.weight') and sources[k] != k:
            mapped[k] = from_reference_layout(mapped[k], owner.max_out, owner.groups)
    return mapped


def _classifier_key(family: str, model: nn.Module) -> str:
    return 'head.fc.fc.weight' if family == 'vgg' else f'{model.bcos_cfg["classifier"]}.fc.weight'


def _mismatch_message(state_dict, model, family, unexpected, missing, mismatched, sources) -> str:
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    arch = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    parts = [list_keys(what, items) for what, items in (('unexpected keys', unexpected), ('missing keys', missing),
                                                       ('shape mismatches', mismatched)) if items]
    hints = []
    ckpt_arch, model_arch = guess_v2_arch(state_dict), _arch_of(ours, family)
    if ckpt_arch != model_arch and (ckpt_arch or model_arch):
        hints.append(f'the checkpoint looks like B-cos v2 {ckpt_arch or "<unknown architecture>"}, '
                     f'the model like {model_arch or "<no v2 architecture>"}')
    head_key = _classifier_key(family, model)
    if head_key in sources and head_key in ours:
        c_ckpt, c_model = tuple(state_dict[sources[head_key]].shape)[0], ours[head_key][0]
        if c_ckpt != c_model:
            hints.append(f'the checkpoint has {c_ckpt} classes, the model {c_model}: build it with '
                         f'num_classes={c_ckpt}, or pass allow_new_head=True to fine-tune a new classifier')
    return (f'B-cos v2 checkpoint does not fit {arch}: ' + '; '.join(parts) +
            ('. ' + '; '.join(hints) if hints else '') + '.')


def _arch_of(keys_shapes: Dict[str, Tuple[int, ...]], family: str) -> Optional[str]:
    sig = _signature(keys_shapes, family)
    return next((n for n, c in V2_ARCHS.items() if c['family'] == family and c['blocks'] == sig), None)
