"""The ends of a converted network: the stem takes the 6-channel [x, 1-x] input (§4) and the
classifier gets the fixed logit map of Eq. 16 (as a `BcosClassifier`, or v1/v2's 1x1 conv head)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..layers import BcosClassifier, BcosConv2d, BcosConv2dSame, BcosConvClassifier, BcosLinear
from .rewrite import convert_tree
from .rules import ConversionContext, UnsupportedModuleError

__all__ = ['classifier_path', 'classifier_paths', 'convert_head', 'convert_stem', 'reconvert_classifier',
           'set_submodule', 'stem_paths']


def _module_path(model: nn.Module, target: Optional[nn.Module]) -> Optional[str]:
    return next((n for n, m in model.named_modules() if m is target), None) if target is not None else None


def stem_paths(model: nn.Module) -> List[str]:
    """Convs that take the image: timm's pretrained_cfg['first_conv'], else the first Conv2d. A
    first_conv that names a container (a conv stem in place of a patchify conv: ViT-C) stands for
    its first Conv2d."""
    first = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv')
    if first:
        return [_first_conv(model, path) for path in ([first] if isinstance(first, str) else first)]
    return next(([n] for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), [])


def _first_conv(model: nn.Module, path: str) -> str:
    module = _get_submodule(model, path)
    if module is None or isinstance(module, (nn.Conv2d, nn.Linear)):
        return path
    inner = next((n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)), None)
    return f'{path}.{inner}' if inner else path


def classifier_paths(model: nn.Module) -> List[str]:
    """Every classifier whose outputs are the logits: a distilled model's (DeiT, LeViT) averages two,
    ``(head(x) + head_dist(x)) / 2``, so both need the logit map of Eq. 16."""
    found = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if isinstance(found, (tuple, list)):
        paths = [_module_path(model, m) for m in found]
        if all(p is not None for p in paths):
            return paths
    path = classifier_path(model)
    return [path] if path is not None else []


def classifier_path(model: nn.Module) -> Optional[str]:
    """timm's get_classifier() (the first of a distilled model's two), else
    pretrained_cfg['classifier'], else the last Linear."""
    if hasattr(model, 'get_classifier'):
        found = model.get_classifier()
        path = _module_path(model, found[0] if isinstance(found, (tuple, list)) and found else found)
        if path is not None:
            return path
    cfg_path = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    if isinstance(cfg_path, str) and isinstance(_get_submodule(model, cfg_path), nn.Linear):
        return cfg_path
    return next((n for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)


def _get_submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def set_submodule(model: nn.Module, path: str, module: nn.Module, ctx: ConversionContext) -> None:
    parent, _, name = path.rpartition('.')
    ctx.set(model.get_submodule(parent) if parent else model, name, module)


def convert_stem(model: nn.Module, paths: Sequence[str], in_chans: int, ctx: ConversionContext) -> None:
    """Make each stem conv take the `in_chans`-channel encoding. A stem that takes a multiple of the
    image's channels (TResNet's conv after a 4x4 space-to-depth: 16 x 3) takes that multiple of
    `in_chans` (the rearrangement is linear and channel-count agnostic)."""
    image_chans = getattr(model, 'in_chans', None)  # as built (timm models keep it)
    if not isinstance(image_chans, int) or image_chans < 1:
        image_chans = ((getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or (3,))[0]
    for path in paths:
        conv = _get_submodule(model, path)
        if isinstance(conv, BcosLinear) and conv.in_features % image_chans == 0:
            _convert_linear_stem(model, path, conv, image_chans, in_chans, ctx)
            continue
        if not isinstance(conv, BcosConv2d):
            raise UnsupportedModuleError(path, type(conv).__name__, 'the stem must be a convolution or a linear '
                                                                    'patch embedding')
        multiple = conv.in_channels // image_chans if conv.in_channels % image_chans == 0 else 1
        stem_chans = in_chans * multiple
        if conv.in_channels in (in_chans, stem_chans):
            continue
        if conv.groups != 1:
            raise UnsupportedModuleError(path, 'grouped stem conv', f'cannot change its input to {stem_chans} channels')
        kwargs = dict(stride=conv.stride, dilation=conv.dilation, **ctx.bcos_kwargs())
        if isinstance(conv, BcosConv2dSame):
            new = BcosConv2dSame(stem_chans, conv.out_channels, conv.kernel_size, **kwargs)
        else:
            new = BcosConv2d(stem_chans, conv.out_channels, conv.kernel_size, padding=conv.padding,
                             padding_mode=conv.padding_mode, **kwargs)
        set_submodule(model, path, new.to(device=conv.weight.device, dtype=conv.weight.dtype), ctx)


def _convert_linear_stem(model: nn.Module, path: str, stem: BcosLinear, image_chans: int, in_chans: int,
                         ctx: ConversionContext) -> None:
    """A linear patch embedding (NaFlexViT's) of flattened image patches: the patchify reshape takes
    any channel count, so the layer takes ``in_chans`` per pixel instead of the image's."""
    features = stem.in_features // image_chans * in_chans
    if features != stem.in_features:
        new = BcosLinear(features, stem.out_features, **ctx.bcos_kwargs())
        set_submodule(model, path, new.to(device=stem.weight.device, dtype=stem.weight.dtype), ctx)


def convert_head(model: nn.Module, path: Optional[str], ctx: ConversionContext, head: str, logit_bias: Optional[float],
                  logit_temperature: Optional[float]) -> Optional[float]:
    """Give the classifier the logit map of Eq. 16; returns the logit bias used."""
    clf = _get_submodule(model, path) if path else None
    if not isinstance(clf, BcosLinear):
        if logit_bias is not None or head == 'conv':
            raise UnsupportedModuleError(path or '', type(clf).__name__ if clf is not None else 'no classifier',
                                         'the logit bias / conv head needs a Linear classifier')
        return None
    num_classes = clf.out_features
    if logit_bias is None:
        logit_bias = -math.log(num_classes - 1) if num_classes > 1 else 0.0
    kwargs = dict(logit_bias=logit_bias, logit_temperature=logit_temperature, **ctx.bcos_kwargs())
    if clf.bias is not None:
        kwargs['bias'] = True
    if head == 'auto':
        new = BcosClassifier(clf.in_features, num_classes, **kwargs)
    else:
        parent = model.get_submodule(path.rpartition('.')[0]) if '.' in path else model
        pool = getattr(parent, 'global_pool', None)
        if pool is None or type(pool).__name__ != 'SelectAdaptivePool2d':
            raise UnsupportedModuleError(path, "head='conv'", 'needs a timm global_pool (SelectAdaptivePool2d) '
                                                              'next to the classifier')
        from timm.layers import SelectAdaptivePool2d
        ctx.set(parent, 'global_pool', SelectAdaptivePool2d(pool_type='', flatten=False))
        new = BcosConvClassifier(clf.in_features, num_classes, **kwargs)
    new = new.to(device=clf.weight.device, dtype=clf.weight.dtype)
    if ctx.copy_weights:  # B-cosification: the trained classifier (a 1x1 conv before pooling: the same map)
        layer = new if head == 'auto' else new.fc
        with torch.no_grad():
            layer.weight.copy_(clf.weight.view_as(layer.weight))
            if clf.bias is not None:
                layer.bias.copy_(clf.bias)
    set_submodule(model, path, new, ctx)
    return logit_bias


def reconvert_classifier(model: nn.Module, bcos_cfg: Dict[str, Any]) -> Optional[float]:
    """After timm's ``reset_classifier``: convert the new classifier with the model's conversion
    settings and give it the logit map of Eq. 16 again; returns the logit bias used."""
    ctx = ConversionContext.create(bcos_cfg['b'], bcos_cfg['max_out'], bcos_cfg['norm'])
    logit_bias = None
    for path in classifier_paths(model) or [None]:  # both heads of a distilled model
        if path is not None:
            set_submodule(model, path, convert_tree(model.get_submodule(path), path, ctx), ctx)
        logit_bias = convert_head(model, path, ctx, bcos_cfg['head'], logit_bias, bcos_cfg['logit_temperature'])
    return logit_bias
