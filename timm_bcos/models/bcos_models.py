"""timm registry entries: ``import timm_bcos`` makes these names work with ``timm.create_model``.

- ``bcos_<arch>``: the paper's design (B=2, MaxOut 2, no norms, v1's output scale, 6-channel input)
  built by converting timm's ``<arch>`` (paper §3.3).
- The paper's own trained models (B-cos v1 release, `timm_bcos.weights.v1`) are ``v1_*`` tags of
  these names: ``bcos_densenet121.v1_in1k_long`` (the default of ``bcos_densenet121``: the best
  one, "training+"), ``.v1_in1k``, ``bcos_resnet34.v1_in1k``, ``bcos_vgg11.v1_in1k``,
  ``bcos_inception_v3.v1_in1k`` and ``bcos_simple_cifar.v1_cifar10_b1`` ... ``_b2_5`` (Tab. 1's
  B ablation). A ``v1_*`` tag builds exactly v1's architecture (`create_v1_model`: conv head,
  v1's logit temperature and bias, per-family scale, VGG head), also without ``pretrained``; so the
  four ImageNet names build v1's architecture by default. ``bcos_simple_cifar``'s default stays
  our untagged `BcosSimpleNet` design.
- ``bcosv2_<arch>``: the B-cos v2 design (uncentered bias-free BN, MaxOut 1, 1x1 B-cos conv head
  before global pooling, logit bias -log(999)), whose authors released ImageNet weights: tag
  ``.in1k`` loads them (`timm_bcos.weights.v2` maps their keys onto ours).
- ``bcos_simple_cifar`` / ``bcos_simple_cifar_plain``: the paper's 9-layer CIFAR-10 network with
  and without MaxOut (§4 "Models"); ``bcos_simple_cifar_tiny``: the same at a quarter of the width
  (16-64 channels), small enough to ship trained weights in the package: tag ``.fashion_mnist``
  (the default) is the shipped model, trained on Fashion-MNIST (``conversion/recipes/``).
- ``baseline_simple_cifar`` / ``baseline_simple_cifar_tiny``: the same layouts as conventional CNNs
  (conv + BatchNorm + ReLU, RGB input, cross entropy): the baselines of training and evaluation.

The module's name files them in timm as ``list_models(module='bcos_models')``; ``list_models('bcos*')`` lists them too.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable, Dict, Optional

import timm
from timm.models import (PretrainedCfg, generate_default_cfgs, get_pretrained_cfg, register_model,
                         resolve_pretrained_cfg)
from torch import nn

from .._utils import ASSETS
from ..convert import bcosify as bcosify_model
from ..convert import convert_to_bcos
from ..weights.v1 import V1_MODELS, create_v1_model, map_v1_state_dict, v1_weights_file
from ..weights.v2 import V2_ARCHS, create_v2_model, map_v2_state_dict
from .builder import build_bcos_model
from .conv_stem import ConvStemPatchEmbed
from .simple_cifar import BcosSimpleNet, SimpleConvNet

__all__ = ['PAPER_ARCHS', 'PAPER_DESIGN', 'SHIPPED_DIR', 'TINY_WIDTHS', 'V1_ARCHS']

PAPER_ARCHS = ('vgg11', 'resnet18', 'resnet34', 'resnet50', 'resnext50_32x4d', 'densenet121', 'densenet161',
               'inception_v3', 'efficientnet_b0', 'mobilenetv3_large_100', 'convnext_tiny', 'vit_tiny_patch16_224')
# Architecture defaults of the converted models: the ViT takes any input size (its positional embedding
# is resampled), as a CNN does (grid pointing game images are twice the size).
_ARCH_DEFAULTS = {'vit_tiny_patch16_224': dict(dynamic_img_size=True)}
# B-cos v2's ViT-C (`ConvStemPatchEmbed`): timm's ViT with a conv stem and one block fewer (its compute).
_VITC = {'vitc_tiny_patch16_224': ('vit_tiny_patch16_224', dict(dynamic_img_size=True, embed_layer=ConvStemPatchEmbed,
                                                                depth=11))}
PAPER_DESIGN = dict(b=2.0, max_out=2, norm='none', head='auto', logit_bias=None, logit_temperature=None,
                    calibrate=True)
_PAPER = dict(paper_name='B-cos Networks: Alignment is All We Need for Interpretability',
              paper_ids='arXiv:2205.10268', origin_url='https://github.com/moboehle/B-cos')


def _converted_cfg(base: str, **kwargs) -> Dict[str, Any]:
    """pretrained_cfg of a converted timm architecture: timm's, with the 6-channel input.

    mean/std are one-value identities on [0, 1] images: the [x, 1-x] encoding (`timm_bcos.AddInverse`,
    added by `timm_bcos.create_transform`) replaces the normalisation, and a single value fits both
    timm's Normalize on 3-channel images and its channel checks for a 6-channel model.
    """
    cfg = get_pretrained_cfg(base)
    out = dict(url='', num_classes=1000, input_size=(6,) + tuple(cfg.input_size[1:]), pool_size=cfg.pool_size,
               crop_pct=cfg.crop_pct, interpolation=cfg.interpolation, mean=(0.0,), std=(1.0,),
               first_conv=cfg.first_conv, classifier=cfg.classifier, license='apache-2.0', **_PAPER)
    if cfg.min_input_size:
        out['min_input_size'] = (6,) + tuple(cfg.min_input_size[1:])
    out.update(kwargs)
    return out


_V2_HEADS = {'resnet': 'fc.fc', 'densenet': 'classifier.fc', 'vgg': 'head.fc.fc'}


def _v2_cfg(name: str) -> Dict[str, Any]:
    arch = V2_ARCHS[name]
    return _converted_cfg(
        arch['timm_arch'], url=arch['url'], classifier=_V2_HEADS[arch['family']], crop_pct=0.875,
        interpolation='bilinear', paper_name='B-cos Alignment for Inherently Interpretable CNNs and Vision '
        'Transformers', paper_ids='arXiv:2306.10898', origin_url='https://github.com/B-cos/B-cos-v2',
        description=f'B-cos v2 {name} (ImageNet-1k), top-1 {arch["top1"]:.2f}% / top-5 {arch["top5"]:.2f}% as '
                    f'reported by the B-cos v2 authors; their released weights.')


def _simple_cifar_cfg(in_chans: int = 6, **kwargs) -> Dict[str, Any]:
    cfg = dict(url='', num_classes=10, input_size=(in_chans, 32, 32), pool_size=(8, 8), crop_pct=1.0,
               interpolation='bilinear', mean=(0.0,) * (1 if in_chans == 6 else 3),
               std=(1.0,) * (1 if in_chans == 6 else 3), first_conv='features.0', classifier='classifier',
               license='apache-2.0', **_PAPER)
    cfg.update(kwargs)
    return cfg


#: The shipped weights (package data): ``bcos_simple_cifar_tiny.fashion_mnist``.
SHIPPED_DIR = ASSETS / 'weights'
_FASHION_MNIST = dict(
    file=str(SHIPPED_DIR / 'bcos_simple_cifar_tiny.fashion_mnist.safetensors'),
    label_names=('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                 'Ankle boot'),
    description='Trained on Fashion-MNIST (28 px grey images, resized to 32 px and repeated to RGB) with '
                'conversion/recipes/bcos_simple_cifar_tiny.fashion_mnist.json; metrics in '
                'hub_cards/bcos_simple_cifar_tiny.fashion_mnist/.')


# Where our converted model keeps the classifier (`BcosConvClassifier.fc` for head='conv').
_V1_CLASSIFIERS = {'densenet': 'classifier.fc', 'resnet': 'fc.fc', 'vgg': 'head.fc.fc', 'inception': 'fc.fc',
                   'simple': 'classifier'}
_V1_LICENSE = ("license unclear: the v1 repository's README says BSD 2.0, its LICENSE file grants use for "
               "non-commercial research and education only; check with the authors before other use")
#: v1 architectures (``bcos_<arch>``) whose ``v1_*`` tags are the paper's released weights.
V1_ARCHS = tuple(dict.fromkeys(key.split('.')[0] for key in V1_MODELS))
# timm's default tag is the first one with weights: v1's best DenseNet-121 ("training+", 74.4%).
_V1_ORDER = ('densenet121.v1_in1k_long',) + tuple(k for k in V1_MODELS if k != 'densenet121.v1_in1k_long')


def _v1_cfg(key: str) -> Dict[str, Any]:
    """pretrained_cfg of the v1 checkpoint `key`: its URL, v1's test transform, the authors' accuracy."""
    v1 = V1_MODELS[key]
    family = v1['family']
    table = 'Tab. 1, CIFAR-10 B ablation' if family == 'simple' else 'Tab. 2'
    data = 'CIFAR-10 test' if family == 'simple' else 'ImageNet val'
    long = ' "training+": 200 epochs, cosine schedule,' if key.endswith('_long') else ''
    cfg = dict(url=v1['url'], num_classes=v1['num_classes'], input_size=v1['input_size'], crop_pct=v1['crop_pct'],
               interpolation=v1['interpolation'], classifier=_V1_CLASSIFIERS[family], license='other',
               description=f'B-cos v1 {key.split(".")[0]} (v1 experiment {v1["v1_experiment"]},{long} their released '
                           f'weights): top-1 {v1["top1"]}% on {data} as reported by the authors (paper {table}).',
               notes=tuple(n for n in (v1.get('notes'), _V1_LICENSE) if n))
    return _simple_cifar_cfg(**cfg) if family == 'simple' else _converted_cfg(v1['timm_arch'], **cfg)


_FASHION_MNIST_BCOSIFIED = dict(
    file=str(SHIPPED_DIR / 'bcos_resnet18.fashion_mnist_bcosified.safetensors'), num_classes=10,
    input_size=(6, 32, 32), pool_size=None, crop_pct=1.0, label_names=_FASHION_MNIST['label_names'],
    paper_name='B-cosification: Transforming Deep Neural Networks to be Inherently Interpretable',
    paper_ids='arXiv:2411.00715', origin_url='https://github.com/shrebox/B-cosification',
    description="timm's resnet18 trained on Fashion-MNIST at 32 px (cross entropy), B-cosified (timm_bcos.bcosify "
                'defaults) and fine-tuned: conversion/scripts/bcosify_fashion_mnist.sh; metrics, and the '
                'conventional original\'s, in hub_cards/bcos_resnet18.fashion_mnist_bcosified/. Weights stored in '
                'float16.')

#: ``bcosify`` arguments (`timm_bcos.convert.bcosify_args`) of the B-cosified pretrained tags.
BCOSIFIED_TAGS = {
    'bcos_resnet18.fashion_mnist_bcosified': dict(
        b=2.0, norm='bnu', head='auto', logit_bias=-math.log(9), strict=True, preserve_function=False,
        keep_biases=False, activations='keep', max_pool='avg', normalized=False, mean=[0.0] * 3, std=[1.0] * 3),
}

default_cfgs = generate_default_cfgs({
    **{f'bcos_{arch}': _converted_cfg(arch) for arch in PAPER_ARCHS if arch not in V1_ARCHS},
    **{f'bcos_{name}': _converted_cfg(base, first_conv='patch_embed.proj.0.conv') for name, (base, _) in _VITC.items()},
    **{f'bcosv2_{name}.in1k': _v2_cfg(name) for name in V2_ARCHS},
    'bcos_simple_cifar': _simple_cifar_cfg(),
    **{f'bcos_{key}': _v1_cfg(key) for key in _V1_ORDER},
    'bcos_resnet18.fashion_mnist_bcosified': _converted_cfg('resnet18', **_FASHION_MNIST_BCOSIFIED),
    'bcosified': _converted_cfg('resnet18', paper_name=None, paper_ids=None, origin_url=None,
                                description='a B-cosified timm model (timm_bcos.bcosify; default: resnet18)'),
    'bcos_simple_cifar_plain': _simple_cifar_cfg(),
    'bcos_simple_cifar_tiny.fashion_mnist': _simple_cifar_cfg(**_FASHION_MNIST),
    'baseline_simple_cifar': _simple_cifar_cfg(in_chans=3, paper_name=None, paper_ids=None, origin_url=None),
    'baseline_simple_cifar_tiny': _simple_cifar_cfg(in_chans=3, paper_name=None, paper_ids=None, origin_url=None),
})
# timm would make the first tag with weights (v1_cifar10_b1, fashion_mnist_bcosified) the default: keep the
# untagged design (ImageNet classes, the paper's conversion).
for _name in ('bcos_simple_cifar', 'bcos_resnet18'):
    default_cfgs[_name].tags.remove('')
    default_cfgs[_name].tags.appendleft('')

TINY_WIDTHS = (16, 16, 32, 32, 32, 64, 64, 64)


def build_bcosified(base_model: str = 'resnet18', bcosify: Optional[Dict[str, Any]] = None, in_chans: int = 6,
                    calibrate: bool = True, **kwargs) -> nn.Module:
    """timm's `base_model` (random weights) B-cosified with the arguments `bcosify`
    (`timm_bcos.convert.bcosify_args`; default: `timm_bcos.bcosify`'s): the structure that a saved
    B-cosified model's weights, scales included, load into (``calibrate=False``: the checkpoint
    has the scales; the registry passes it with ``pretrained=True``)."""
    if in_chans % 2:
        raise ValueError(f'a B-cosified model takes [x, 1-x]: in_chans must be even, got {in_chans}')
    model = timm.create_model(base_model, pretrained=False, in_chans=in_chans // 2, **kwargs)
    return bcosify_model(model, calibrate=calibrate, **(bcosify or {}))


def _convert_builder(base: str, design: Dict[str, Any], defaults: Optional[Dict[str, Any]] = None
                     ) -> Callable[..., nn.Module]:
    """Build timm's `base` (with architecture arguments `defaults`, else `_ARCH_DEFAULTS`') and convert it;
    conversion arguments (b, max_out, ...) may be overridden.
    With a ``bcosify`` argument (`timm_bcos.convert.bcosify_args`) it is B-cosified instead (a
    saved B-cosified model, or the ``*_bcosified`` tags)."""
    def builder(bcosify: Optional[Dict[str, Any]] = None, **kwargs) -> nn.Module:
        if bcosify is not None:
            clash = sorted(k for k in design if k in kwargs and k != 'calibrate')
            if clash:
                raise ValueError(f'{clash} are conversion arguments; a B-cosified model takes them in bcosify=')
            return build_bcosified(base, bcosify, **kwargs)
        convert = {k: kwargs.pop(k, v) for k, v in design.items()}
        arch = _ARCH_DEFAULTS.get(base, {}) if defaults is None else defaults
        model = timm.create_model(base, pretrained=False, **{**arch, **kwargs})
        # The name's own architecture arguments are not the user's: the saved config rebuilds them by name
        # (and a class such as ViT-C's embed_layer is not JSON).
        model._model_args = {k: v for k, v in getattr(model, '_model_args', {}).items() if k not in arch}
        return convert_to_bcos(model, in_chans=kwargs.get('in_chans', 6), **convert)
    return builder


def _v1_weights(key: str, cfg: PretrainedCfg, cache_dir: Optional[str]) -> PretrainedCfg:
    """`cfg` reading v1's release file from its unique cache name (`v1_weights_file`, downloaded once).

    Every v1 URL ends in ``/download``: timm's URL cache would store them all as ``download``. A
    weight source the user chose (file, state dict, Hub, another URL) is kept.
    """
    if cfg.file or cfg.state_dict or cfg.hf_hub_id or cfg.url != V1_MODELS[key]['url']:
        return cfg
    return dataclasses.replace(cfg, file=v1_weights_file(key, cache_dir=str(cache_dir) if cache_dir else None))


def _register(name: str, builder: Callable[..., nn.Module], doc: str,
              filter_fn: Optional[Callable] = None, converted: bool = False) -> None:
    """Register `name`; a ``v1_*`` pretrained tag (``name.v1_...``) builds that v1 checkpoint's architecture.

    A `converted` model is calibrated when built from scratch; with ``pretrained=True`` its scales
    come from the checkpoint (`CalibratedConstant`), so the calibration pass is skipped.

    timm passes ``name.tag`` as ``pretrained_cfg='tag'``; it is resolved here (with the overlay) to
    choose the builder, and handed on resolved.
    """
    v1_arch = next((arch for arch in V1_ARCHS if name == f'bcos_{arch}'), None)

    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        cfg = resolve_pretrained_cfg(name, kwargs.pop('pretrained_cfg', None),
                                     kwargs.pop('pretrained_cfg_overlay', None))
        if f'{name}.{cfg.tag}' in BCOSIFIED_TAGS:
            kwargs.setdefault('bcosify', BCOSIFIED_TAGS[f'{name}.{cfg.tag}'])
        if v1_arch is None or not (cfg.tag or '').startswith('v1_') or 'bcosify' in kwargs:
            if converted and pretrained:
                kwargs.setdefault('calibrate', False)
            return build_bcos_model(builder, name, pretrained, pretrained_filter_fn=filter_fn, pretrained_cfg=cfg,
                                    **kwargs)
        key = f'{v1_arch}.{cfg.tag}'
        if pretrained:
            cfg = _v1_weights(key, cfg, kwargs.get('cache_dir'))
        return build_bcos_model(partial(create_v1_model, key), name, pretrained, pretrained_cfg=cfg,
                                pretrained_filter_fn=partial(map_v1_state_dict, allow_new_head=True), **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = doc
    register_model(entrypoint)


def _paper_doc(arch: str) -> str:
    """Entrypoint docstring of ``bcos_<arch>``; names the default ``v1_*`` tag where v1 released weights."""
    doc = f"B-cos {arch} (paper design: B=2, MaxOut 2, no norms, 6-channel input), converted from timm's {arch}."
    if arch in V1_ARCHS:
        tags = default_cfgs[f'bcos_{arch}'].tags
        doc += (f" Default tag {tags[0]}: v1's architecture for the paper's released weights (conv head, v1's "
                f"logit temperature and bias); tags: {', '.join(tags)}.")
    return doc


for _arch in PAPER_ARCHS:
    _register(f'bcos_{_arch}', _convert_builder(_arch, PAPER_DESIGN), _paper_doc(_arch), converted=True)
for _name, (_base, _defaults) in _VITC.items():
    _register(f'bcos_{_name}', _convert_builder(_base, PAPER_DESIGN, _defaults),
              f"B-cos ViT-C (B-cos v2 §5): timm's {_base} with a conv stem (`ConvStemPatchEmbed`: 3x3 stride-2 "
              f"conv + BN + ReLU layers, then a 1x1 projection) and depth 11, converted with the paper's design.",
              converted=True)
for _name in V2_ARCHS:
    _register(f'bcosv2_{_name}', partial(create_v2_model, _name),
              f"B-cos v2 {_name}: uncentered bias-free BN, MaxOut 1, conv head; pretrained=True loads the v2 "
              f"authors' ImageNet weights.", filter_fn=partial(map_v2_state_dict, allow_new_head=True))
_register('bcosified', build_bcosified, "A B-cosified timm model (timm_bcos.bcosify): arguments base_model (timm's "
          "architecture, default resnet18) and bcosify (timm_bcos.convert.bcosify_args); what a saved B-cosified model "
          "loads as.",
          converted=True)
_register('bcos_simple_cifar', BcosSimpleNet, "The paper's 9-layer CIFAR-10 B-cos network (MaxOut 2, B=2). Tags "
          "v1_cifar10_b1 ... v1_cifar10_b2_5: v1's B ablation nets with the paper's released weights.")
_register('bcos_simple_cifar_plain', lambda **kw: BcosSimpleNet(**{'max_out': 1, **kw}),
          "The paper's 9-layer CIFAR-10 B-cos network without MaxOut (B=2).")
_register('bcos_simple_cifar_tiny', lambda **kw: BcosSimpleNet(**{'widths': TINY_WIDTHS, **kw}),
          "The paper's 9-layer CIFAR-10 B-cos network at a quarter width (16-64 channels, MaxOut 2, B=2).")
_register('baseline_simple_cifar', SimpleConvNet,
          "Conventional counterpart of bcos_simple_cifar (conv + BN + ReLU, RGB input): the baseline.")
_register('baseline_simple_cifar_tiny', lambda **kw: SimpleConvNet(**{'widths': TINY_WIDTHS, **kw}),
          "Conventional counterpart of bcos_simple_cifar_tiny (16-64 channels): the baseline.")
