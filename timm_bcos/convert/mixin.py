"""Methods every converted B-cos model gains (explanation mode, the Eq. 13 check, explain)."""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence, Union

from torch import Tensor, nn

from ..explain import Explanation, check_dynamic_linearity, explain
from ..layers import explanation_mode
from .calibrate import calibrate_scales
from .heads import reconvert_classifier

__all__ = ['BcosModelMixin', 'attach_bcos_mixin', 'bcos_class']

_CLASSES: Dict[type, type] = {}


class BcosModelMixin:
    """Mixed into the class of a converted model; `bcos_cfg` holds the conversion settings."""

    bcos_cfg: Dict[str, Any]

    def explanation_mode(self, active: bool = True):
        """Context manager: detach every dynamic factor, so gradients are rows of W(x) (§3.2.1)."""
        return explanation_mode(self, active)

    def check_dynamic_linearity(self, x: Tensor, targets: Optional[Union[Sequence[int], Tensor]] = None) -> float:
        """Max relative error of ``sum(W(x) * x) + b`` vs the outputs (Eq. 13); see `check_dynamic_linearity`."""
        return check_dynamic_linearity(self, x, targets)

    def explain(self, x: Tensor, target=None, **kwargs) -> Explanation:
        """Explain outputs (or, with ``layer=``/``neuron=``, inner neurons) exactly by W(x); see `timm_bcos.explain`."""
        return explain(self, x, target, **kwargs)

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        """timm's reset_classifier, then the new classifier is converted to B-cos again (and, for a
        calibrated model, calibrated: `calibrate_scales` on the new classifier only)."""
        if not hasattr(super(), 'reset_classifier'):
            raise AttributeError(f'{type(self).__name__} has no reset_classifier (not a timm model)')
        super().reset_classifier(num_classes, *args, **kwargs)
        self.bcos_cfg['logit_bias'] = reconvert_classifier(self, self.bcos_cfg)
        if self.bcos_cfg.get('calibrate') and self.bcos_cfg.get('classifier') and num_classes:
            calibrate_scales(self, layers=[self.bcos_cfg['classifier']],
                             temperature=self.bcos_cfg.get('logit_temperature') is None)


def bcos_class(cls: type) -> type:
    """The class of a converted `cls` model: ``Bcos<Class>(BcosModelMixin, cls)``, made once per class.

    It is made at run time, so pickle cannot find it by name: its instances pickle (and deep-copy)
    as "the B-cos class of `cls`" (`_new_converted`), which unpickling makes again.
    """
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f'Bcos{cls.__name__}', (BcosModelMixin, cls),
                             {'__module__': cls.__module__, '__reduce_ex__': _reduce_converted})
    return _CLASSES[cls]


def _reduce_converted(self, protocol: int):
    return _new_converted, (type(self).__bases__[1],), self.__getstate__()


def _new_converted(cls: type) -> nn.Module:
    converted = bcos_class(cls)
    return converted.__new__(converted)


def attach_bcos_mixin(model: nn.Module, bcos_cfg: Dict[str, Any]) -> nn.Module:
    """Give `model` the `BcosModelMixin` methods (its class becomes a cached ``Bcos<Class>``)."""
    if not isinstance(model, BcosModelMixin):
        model.__class__ = bcos_class(type(model))
    model.bcos_cfg = dict(bcos_cfg)
    if isinstance(getattr(model, 'in_chans', None), int):  # timm's input config reads it (data configs, export)
        model.in_chans = bcos_cfg['in_chans']
    cfg = getattr(model, 'pretrained_cfg', None)
    if isinstance(cfg, dict):
        cfg = copy.deepcopy(cfg)
        if 'input_size' in cfg:
            cfg['input_size'] = (bcos_cfg['in_chans'],) + tuple(cfg['input_size'][1:])
        for key in ('test_input_size', 'min_input_size'):
            if cfg.get(key):
                cfg[key] = (bcos_cfg['in_chans'],) + tuple(cfg[key][1:])
        # The image pipeline stops at [0, 1] images; the [x, 1-x] encoding replaces the normalisation.
        # One value (identity) fits timm's Normalize on 3-channel images and its channel checks.
        cfg['mean'], cfg['std'] = (0.0,), (1.0,)
        model.pretrained_cfg = cfg
        if hasattr(model, 'default_cfg'):
            model.default_cfg = cfg
    return model
