"""Saving a model in timm's Hub format, so that ``local-dir:`` and ``hf-hub:`` load it back and timm's
own data pipeline reads its config."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence

from torch import nn

from .._utils import write_json

__all__ = ['save_pretrained']

# What a config says about the weights it came from, dropped when a run saves weights of its own.
_SOURCE_KEYS = ('tag', 'description', 'license', 'notes')


def save_pretrained(model: nn.Module, folder: str, *, description: Optional[str] = None,
                    label_names: Optional[Sequence[str]] = None, data_config: Optional[Dict[str, Any]] = None,
                    fsync: bool = False) -> None:
    """``timm.models.save_for_hf`` (``config.json`` + ``model.safetensors``) with a config that fits.

    timm widens mean/std to one value per *model* input channel (6 for the [x, 1-x] encoding), which
    its own ``Normalize`` cannot apply to the 3-channel images the encoding is made from; they are
    written for the image channels instead, so ``timm.data.create_transform(**resolve_data_config(
    model=m))`` works on a loaded model (`timm_bcos.create_transform` adds the encoding). With a
    `description` (new weights, e.g. a training run) the source weights' tag, description, licence
    and notes are replaced by it. A B-cosified model is saved as ``bcos_<arch>`` or ``bcosified``
    with its `timm_bcos.convert.bcosify_args`, which rebuild it on loading.
    """
    import timm

    model_config = dict(label_names=list(label_names)) if label_names is not None else {}
    model_config.update(_bcosified_config(model))
    timm.models.save_for_hf(model, folder, model_config=model_config, safe_serialization=True,
                            data_config=data_config)
    path = os.path.join(folder, 'config.json')
    with open(path) as f:
        config = json.load(f)
    cfg = config['pretrained_cfg']
    if label_names is not None:
        cfg['label_names'] = list(label_names)  # not the source weights' classes
    if description is not None:
        for key in _SOURCE_KEYS:
            cfg.pop(key, None)
        cfg['description'] = description
    if cfg.get('input_size', (3,))[0] == 6:
        cfg.update(mean=[float(cfg['mean'][0])] * 3, std=[float(cfg['std'][0])] * 3)
    write_json(path, config, fsync=fsync)


def _bcosified_config(model: nn.Module) -> Dict[str, Any]:
    """A B-cosified model (`timm_bcos.bcosify`) loads back as ``bcos_<arch>`` (the paper's architectures)
    or the generic ``bcosified`` with its `bcosify_args`: the architecture and model args to save."""
    from ..convert import bcosify_args
    from .bcos_models import PAPER_ARCHS

    bcosified = (getattr(model, 'bcos_cfg', None) or {}).get('bcosified')
    if bcosified is None:
        return {}
    base = bcosified.get('architecture')
    if not base:
        raise ValueError(f'cannot save this B-cosified {type(model).__name__}: its source architecture is unknown '
                         f'(the model had no pretrained_cfg["architecture"], so no timm name rebuilds it)')
    args = dict(bcosify=bcosify_args(model))
    if base not in PAPER_ARCHS:
        args['base_model'] = base
    return dict(pretrained_cfg=dict(architecture=f'bcos_{base}' if base in PAPER_ARCHS else 'bcosified'),
                model_args=args)
