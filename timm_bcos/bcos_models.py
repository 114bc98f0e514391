"""timm registry entries: ``import timm_bcos`` makes these names work with ``timm.create_model``.

- ``bcos_<arch>``: the paper's design (B=2, MaxOut 2, no norms, v1's output scale, 6-channel input)
  built by converting timm's ``<arch>`` (paper §3.3).
- ``bcosv2_<arch>``: the B-cos v2 design (uncentered bias-free BN, MaxOut 1, 1x1 B-cos conv head
  before global pooling, logit bias -log(999)), whose authors released ImageNet weights: tag
  ``.in1k`` loads them (`timm_bcos.v2_weights` maps their keys onto ours).
- ``bcos_simple_cifar`` / ``bcos_simple_cifar_plain``: the paper's 9-layer CIFAR-10 network with
  and without MaxOut (§4 "Models"); ``bcos_simple_cifar_tiny``: the same at a quarter of the width
  (16-64 channels), small enough to ship trained weights in the package.

The file name cannot clash with timm's own modules (``list_models(module='bcos_models')``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Optional

import timm
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
from torch import nn

from .converter import convert_to_bcos
from .models import BcosSimpleNet
from .pretrained import build_bcos_model
from .v2_weights import V2_ARCHS, create_v2_model, map_v2_state_dict

__all__ = ['PAPER_ARCHS', 'PAPER_DESIGN', 'TINY_WIDTHS']

PAPER_ARCHS = ('vgg11', 'resnet18', 'resnet34', 'resnet50', 'resnext50_32x4d', 'densenet121', 'densenet161',
               'inception_v3', 'efficientnet_b0', 'mobilenetv3_large_100', 'convnext_tiny')
PAPER_DESIGN = dict(b=2.0, max_out=2, norm='none', head='auto', logit_bias=None, logit_temperature=None)
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


def _simple_cifar_cfg(**kwargs) -> Dict[str, Any]:
    return dict(url='', num_classes=10, input_size=(6, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                interpolation='bilinear', mean=(0.0,), std=(1.0,), first_conv='features.0',
                classifier='classifier', license='apache-2.0', **_PAPER, **kwargs)


default_cfgs = generate_default_cfgs({
    **{f'bcos_{arch}': _converted_cfg(arch) for arch in PAPER_ARCHS},
    **{f'bcosv2_{name}.in1k': _v2_cfg(name) for name in V2_ARCHS},
    'bcos_simple_cifar': _simple_cifar_cfg(),
    'bcos_simple_cifar_plain': _simple_cifar_cfg(),
    'bcos_simple_cifar_tiny': _simple_cifar_cfg(),
})

TINY_WIDTHS = (16, 16, 32, 32, 32, 64, 64, 64)


def _convert_builder(base: str, design: Dict[str, Any]) -> Callable[..., nn.Module]:
    """Build timm's `base` and convert it; conversion arguments (b, max_out, ...) may be overridden."""
    def builder(**kwargs) -> nn.Module:
        convert = {k: kwargs.pop(k, v) for k, v in design.items()}
        model = timm.create_model(base, pretrained=False, **kwargs)
        return convert_to_bcos(model, in_chans=kwargs.get('in_chans', 6), **convert)
    return builder


def _register(name: str, builder: Callable[..., nn.Module], doc: str,
              filter_fn: Optional[Callable] = None) -> None:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return build_bcos_model(builder, name, pretrained, pretrained_filter_fn=filter_fn, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = doc
    register_model(entrypoint)


for _arch in PAPER_ARCHS:
    _register(f'bcos_{_arch}', _convert_builder(_arch, PAPER_DESIGN),
              f"B-cos {_arch} (paper design: B=2, MaxOut 2, no norms, 6-channel input), converted from timm's {_arch}.")
for _name in V2_ARCHS:
    _register(f'bcosv2_{_name}', partial(create_v2_model, _name),
              f"B-cos v2 {_name}: uncentered bias-free BN, MaxOut 1, conv head; pretrained=True loads the v2 "
              f"authors' ImageNet weights.", filter_fn=partial(map_v2_state_dict, allow_new_head=True))
_register('bcos_simple_cifar', BcosSimpleNet, "The paper's 9-layer CIFAR-10 B-cos network (MaxOut 2, B=2).")
_register('bcos_simple_cifar_plain', lambda **kw: BcosSimpleNet(**{'max_out': 1, **kw}),
          "The paper's 9-layer CIFAR-10 B-cos network without MaxOut (B=2).")
_register('bcos_simple_cifar_tiny', lambda **kw: BcosSimpleNet(**{'widths': TINY_WIDTHS, **kw}),
          "The paper's 9-layer CIFAR-10 B-cos network at a quarter width (16-64 channels, MaxOut 2, B=2).")
