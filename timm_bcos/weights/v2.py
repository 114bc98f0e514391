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
`create_v2_model` applies that change (`prepare_vgg_head`) before converting.

`map_v2_state_dict` renames a v2 state dict (its ``model.state_dict()``, as in the release
files) to ours and validates it strictly; it can be timm's ``pretrained_filter_fn``.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

from torch import Tensor, nn

from ..convert import convert_to_bcos
from ..layers import calibration_keys
from .reference import (LINEAR_SUFFIX, StateDictMismatchError, check_tensor_dict, class_count_hint, classifier_key,
                        compare_mapped_keys, has_reference_vgg_head, mismatch_message, model_family, prepare_vgg_head,
                        rename_keys, rename_reference_keys, strip_linear, to_our_layout)

__all__ = ['V2_ARCHS', 'V2_BASE_URL', 'V2_CONVERT_KWARGS', 'V2StateDictError', 'create_v2_model', 'guess_v2_arch',
           'load_v2_state_dict', 'map_v2_state_dict']

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
                       notes="timm's vgg11_bn with pre_logits.fc1 padding=3 and no upsampling to 7x7 "
                             "(v2's head); see prepare_vgg_head"),
}
for _name, _cfg in V2_ARCHS.items():
    _cfg['v2_entrypoint'] = _name  # bcos.models.pretrained.<name>, torch.hub.load('B-cos/B-cos-v2', <name>)


class V2StateDictError(StateDictMismatchError):
    """A B-cos v2 state dict that does not fit the model (see `StateDictMismatchError`)."""


# --- building ----------------------------------------------------------------------------------

def create_v2_model(name: str, num_classes: int = 1000, state_dict: Optional[Dict[str, Tensor]] = None,
                    **timm_kwargs) -> nn.Module:
    """Build the timm model + conversion that reproduces B-cos v2's ``name`` (a key of `V2_ARCHS`).

    ``state_dict``: an optional v2 state dict (e.g. ``torch.load`` of the release file), mapped
    with `map_v2_state_dict` and loaded strictly.
    """
    import timm

    if name not in V2_ARCHS:
        raise KeyError(f'unknown B-cos v2 architecture {name!r}; known: {sorted(V2_ARCHS)}')
    cfg = V2_ARCHS[name]
    model = timm.create_model(cfg['timm_arch'], pretrained=False, num_classes=num_classes, **timm_kwargs)
    if cfg['family'] == 'vgg':
        prepare_vgg_head(model)
    convert_to_bcos(model, calibrate=False, **cfg['convert_kwargs'])  # v2's layers are unscaled
    if state_dict is not None:
        load_v2_state_dict(model, state_dict)
    return model


def load_v2_state_dict(model: nn.Module, state_dict: Dict[str, Tensor]) -> nn.Module:
    """``model.load_state_dict(map_v2_state_dict(state_dict, model), strict=True)``."""
    model.load_state_dict(map_v2_state_dict(state_dict, model), strict=True)
    return model


# --- key mapping -------------------------------------------------------------------------------

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
    if family == 'vgg' and not has_reference_vgg_head(model):
        raise V2StateDictError("v2's VGG head pads its 7x7 conv by 3 and never upsamples: apply "
                               'prepare_vgg_head(model) before convert_to_bcos (or use create_v2_model)')


def _our_names(state_dict: Dict[str, Tensor], family: str, model: nn.Module) -> Dict[str, str]:
    """v2 checkpoint key -> ours (`rename_reference_keys` after dropping ``.linear``)."""
    stripped = {k: strip_linear(k) for k in state_dict}
    names = rename_reference_keys({stripped[k]: tuple(v.shape) for k, v in state_dict.items()}, family, model)
    return {k: names[stripped[k]] for k in state_dict}


def _module_index_order(keys: Iterable[str], prefix: str) -> List[int]:
    pattern = re.compile(rf'^{re.escape(prefix)}(\d+)\.')
    return sorted({int(m.group(1)) for k in keys for m in [pattern.match(k)] if m})


def _weight_shape(keys_shapes: Dict[str, Tuple[int, ...]], module: str) -> Optional[Tuple[int, ...]]:
    """The weight shape of `module` in our state dict (``<module>{LINEAR_SUFFIX}``) or v2's
    (``<module>.weight``); None if it has none."""
    return next((keys_shapes[k] for k in (f'{module}{LINEAR_SUFFIX}', f'{module}.weight') if k in keys_shapes), None)


def _signature(keys_shapes: Dict[str, Tuple[int, ...]], family: str) -> Optional[Tuple]:
    """The architecture signature of a v2 or our state dict (see `V2_ARCHS['...']['blocks']`)."""
    keys = set(keys_shapes)
    if family == 'resnet':
        stages = tuple(len(_module_index_order(keys, f'layer{s}.')) for s in range(1, 5))
        conv2 = _weight_shape(keys_shapes, 'layer1.0.conv2')
        if conv2 is None or not all(stages):
            return None
        bottleneck = any(k.startswith('layer1.0.conv3.') for k in keys)
        return (stages, tuple(conv2[:2])) + (('bottleneck',) if bottleneck else ())
    if family == 'densenet':
        blocks = tuple(len(_module_index_order(keys, f'features.denseblock{b}.denselayer')) for b in range(1, 5))
        conv0 = _weight_shape(keys_shapes, 'features.conv0')
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
    check_tensor_dict(state_dict, V2StateDictError)
    family = model_family(model, ('resnet', 'densenet', 'vgg'), V2StateDictError,
                          'B-cos v2 checkpoints exist for timm ResNet/ResNeXt, DenseNet and VGG models')
    _check_model_config(model, family)
    optional = calibration_keys(model)  # reference checkpoints have fixed scales: none of these
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in optional}
    reference_format = any(k.endswith(LINEAR_SUFFIX) for k in state_dict)
    names = _our_names(state_dict, family, model) if reference_format else {k: k for k in state_dict}
    mapped, sources = rename_keys(state_dict, names, V2StateDictError)
    head_key = classifier_key(family, model)
    unexpected, missing, mismatched = compare_mapped_keys(mapped, sources, expected, head_key, allow_new_head)
    if unexpected or missing or mismatched:
        arch = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
        ckpt_arch, model_arch = guess_v2_arch(state_dict), _arch_of(expected, family)
        hints = [class_count_hint(state_dict, sources, expected, head_key, model.bcos_cfg['max_out'])]
        if ckpt_arch != model_arch and (ckpt_arch or model_arch):
            hints.insert(0, f'the checkpoint looks like B-cos v2 {ckpt_arch or "<unknown architecture>"}, '
                            f'the model like {model_arch or "<no v2 architecture>"}')
        raise V2StateDictError(mismatch_message(f'B-cos v2 checkpoint does not fit {arch}', unexpected, missing,
                                                mismatched, hints), unexpected, missing, mismatched)
    return to_our_layout(mapped, model) if reference_format else mapped


def _arch_of(keys_shapes: Dict[str, Tuple[int, ...]], family: str) -> Optional[str]:
    sig = _signature(keys_shapes, family)
    return next((n for n, c in V2_ARCHS.items() if c['family'] == family and c['blocks'] == sig), None)
