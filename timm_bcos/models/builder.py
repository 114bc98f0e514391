"""Building registered B-cos models with timm's loader, and clear errors when weights fail to load."""
from __future__ import annotations

import difflib
import json
import os
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from .._utils import first_line, hub_offline, url_cache_dir
from ..convert import calibrate_scales
from ..layers import BcosConv2d, BcosLinear, calibration_keys

__all__ = ['CheckpointMismatchError', 'PretrainedWeightsError', 'build_bcos_model', 'check_state_dict', 'create_model',
           'load_model']


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not fit the model (another architecture or class count)."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights that cannot be read: missing offline, not downloadable, or corrupt."""


def check_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Raise `CheckpointMismatchError` naming every missing, unexpected or mis-shaped key.

    Classifier weights may differ when the model is built for another class count than its
    pretrained_cfg (timm then drops them: fine-tuning); a checkpoint head that fits the model is
    kept. Anything else must match exactly.
    """
    expected = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifiers = cfg.get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    new_head = getattr(model, 'num_classes', None) != cfg.get('num_classes', getattr(model, 'num_classes', None))
    head_keys = {f'{c}.{p}' for c in classifiers for p in ('weight', 'bias')} & set(expected)
    if new_head and head_keys and all(k in state_dict and state_dict[k].shape == expected[k].shape for k in head_keys):
        # The checkpoint's head already fits the model: keep it (timm would drop it because the
        # pretrained_cfg names another class count; this is the same dict timm reads next).
        cfg['num_classes'] = model.num_classes
        new_head = False
    ignored = head_keys if new_head else set()
    # Calibrated scales / temperatures are in a checkpoint of a calibrated model only; either way fits.
    optional = calibration_keys(model)
    if new_head:  # the new head keeps its own scale
        for key in [k for k in state_dict if k in optional and any(k.startswith(f'{c}.') for c in classifiers)]:
            del state_dict[key]
    missing = sorted(set(expected) - set(state_dict) - ignored - optional)
    unexpected = sorted(set(state_dict) - set(expected) - optional)
    shapes = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}'
              for k in sorted(set(state_dict) & set(expected) - ignored)
              if tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f'{what} ({len(keys)}): {keys[:8]}{" ..." if len(keys) > 8 else ""}'
                 for what, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                                    ('shape mismatches', shapes)) if keys]
        head = [k for k in classifiers if f'{k}.weight' in state_dict]
        hint = _mismatch_hint(state_dict, model, head[0]) if head else ''
        name = cfg.get('architecture', type(model).__name__)
        raise CheckpointMismatchError(f'checkpoint does not fit {name}: ' + '; '.join(parts) +
                                      '. Is it a checkpoint of another architecture or class count?' + hint)
    return state_dict


def _features(model: nn.Module, out_indices: Optional[Sequence[int]], feature_cfg: Dict[str, Any]) -> nn.Module:
    """timm's `FeatureListNet` over the model's ``feature_info``, by default every feature level. Its
    Sequential children are flattened when a feature level lies inside one (``features.denseblock1``,
    ``blocks.0``), as timm's own entrypoints ask for those architectures. A ViT gets timm's
    `FeatureGetterNet` (the last 4 blocks' tokens as maps), as timm builds its own."""
    from timm.models import FeatureListNet
    from timm.models._features import FeatureGetterNet

    if not hasattr(model, 'feature_info'):
        raise ValueError(f'{type(model).__name__} has no feature_info: features_only is not supported')
    if _token_model(model):  # as timm builds a ViT's: its forward_intermediates gives (N, C, H, W) maps
        features = FeatureGetterNet(model, out_indices=4 if out_indices is None else out_indices, **feature_cfg)
    else:
        modules = [info['module'] for info in model.feature_info]
        cfg = dict(flatten_sequential=any('.' in m for m in modules), **feature_cfg)
        if getattr(model, 'output_fmt', None) is not None:
            cfg.setdefault('output_fmt', model.output_fmt)
        indices = tuple(range(len(model.feature_info))) if out_indices is None else tuple(out_indices)
        features = FeatureListNet(model, out_indices=indices, **cfg)
    pretrained_cfg = {k: v for k, v in (getattr(model, 'pretrained_cfg', None) or {}).items()
                      if k not in ('num_classes', 'classifier', 'label_names', 'pool_size')}
    features.pretrained_cfg = features.default_cfg = pretrained_cfg
    return features


def _token_model(model: nn.Module) -> bool:
    """A plain transformer over patch tokens (timm's ViT family), whose blocks output (N, L, C)."""
    return hasattr(model, 'patch_embed') and hasattr(model, 'blocks') and hasattr(model, 'forward_intermediates') \
        and hasattr(model, 'num_prefix_tokens')


def _mismatch_hint(state_dict: Dict[str, torch.Tensor], model: nn.Module, head: str) -> str:
    """What to change to fit the checkpoint: its class count and its MaxOut (read off the first B-cos
    layer below the head: ``weight`` rows = outputs x MaxOut)."""
    modules = dict(model.named_modules())
    ours = getattr(modules.get(head), 'max_out', 1)
    theirs = None
    for name, m in modules.items():
        w = state_dict.get(f'{name}.weight')
        outputs = getattr(m, 'out_channels', getattr(m, 'out_features', None))
        if name != head and isinstance(m, (BcosConv2d, BcosLinear)) and w is not None and w.shape[0] % outputs == 0:
            theirs = w.shape[0] // outputs
            break
    classes = state_dict[f'{head}.weight'].shape[0] // (theirs or ours)
    hint = ''
    if classes != getattr(model, 'num_classes', classes):
        hint += f' The checkpoint has {classes} classes: pass num_classes={classes} to match it.'
    if theirs is not None and theirs != ours:
        hint += f' Its B-cos layers have MaxOut {theirs}, the model\'s {ours}: build it with max_out={theirs}.'
    return hint


def _weights_source(cfg: Dict[str, Any]) -> str:
    for key in ('file', 'hf_hub_id', 'url'):
        if cfg.get(key):
            return f'{key}={cfg[key]}'
    return 'no weight source'


def build_bcos_model(
        builder: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        pretrained_filter_fn: Optional[Callable] = None,
        **kwargs,
) -> nn.Module:
    """timm's `build_model_with_cfg`, with every loaded state dict checked and clear load errors;
    ``features_only=True`` (with ``out_indices``) gives the feature extractor of the model (`_features`)."""
    from timm.models import build_model_with_cfg

    features = {k: kwargs.pop(k) for k in ('features_only', 'out_indices', 'feature_cfg') if k in kwargs}
    if features.pop('features_only', False):
        model = build_bcos_model(builder, variant, pretrained, pretrained_filter_fn, **kwargs)
        return _features(model, features.get('out_indices'), features.get('feature_cfg') or {})

    def filter_fn(state_dict, model):
        if pretrained_filter_fn is not None:
            state_dict = pretrained_filter_fn(state_dict, model)
        return check_state_dict(state_dict, model)

    cfg = _resolved_cfg(variant, kwargs) if pretrained else {}
    if pretrained and cfg.get('file') and not os.path.exists(cfg['file']):
        raise PretrainedWeightsError(f'file not found: {cfg["file"]} (the weights of {variant})')
    if pretrained and hub_offline() and not cfg.get('file') and not cfg.get('hf_hub_id') and cfg.get('url'):
        cached = os.path.join(kwargs.get('cache_dir') or url_cache_dir(), os.path.basename(cfg['url'].split('?')[0]))
        if not os.path.exists(cached):  # timm would try to download: fail now, with the way out
            raise PretrainedWeightsError(_unavailable(variant, cfg, 'not in the local cache'))
    try:
        model = build_model_with_cfg(builder, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
        return _calibrate_new_head(model) if pretrained else model
    except CheckpointMismatchError:
        raise
    except Exception as e:
        if not pretrained or not _is_load_error(e):
            raise
        if cfg.get('file') and os.path.exists(cfg['file']):
            raise PretrainedWeightsError(f'cannot read the checkpoint {cfg["file"]} for {variant}: '
                                         f'{type(e).__name__}: {e}. The file is corrupt or not a '
                                         f'safetensors/torch checkpoint.') from e
        raise PretrainedWeightsError(_unavailable(variant, cfg, f'{type(e).__name__}: {e}')) from e


def _calibrate_new_head(model: nn.Module) -> nn.Module:
    """A calibrated checkpoint loaded for another class count (the head was dropped, fine-tuning):
    the new head gets its scale and temperature the same way (`calibrate_scales`)."""
    path = (getattr(model, 'bcos_cfg', None) or {}).get('classifier')
    if not path:
        return model
    layers = {p: m.calibrated for p, m in model.named_modules() if isinstance(m, (BcosConv2d, BcosLinear))}
    head = [c for p, c in layers.items() if p == path or p.startswith(path + '.')]
    if head and not any(head) and any(layers.values()):
        calibrate_scales(model, layers=[path], temperature=model.bcos_cfg.get('logit_temperature') is None)
    return model


def _resolved_cfg(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    from timm.models import get_pretrained_cfg
    cfg = kwargs.get('pretrained_cfg') or get_pretrained_cfg(variant)
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg or {})
    cfg.update(kwargs.get('pretrained_cfg_overlay') or {})
    return cfg


def _unavailable(variant: str, cfg: Dict[str, Any], why: str) -> str:
    return (f'pretrained weights for {variant} are not available ({_weights_source(cfg)}): {why}. '
            f'{"HF_HUB_OFFLINE=1 is set, so only local caches are used. " if hub_offline() else ""}'
            f'Fetch them where there is network access (URLs are cached under $TORCH_HOME/hub/checkpoints, '
            f'Hub repos under $HF_HOME / $HF_HUB_CACHE), or point to a local copy with '
            f'pretrained_cfg_overlay=dict(file=PATH), or load a folder with create_model("local-dir:PATH").')


def _is_load_error(e: Exception) -> bool:
    import urllib.error
    names = {'LocalEntryNotFoundError', 'EntryNotFoundError', 'SafetensorError', 'HfHubHTTPError',
             'OfflineModeIsEnabled', 'UnpicklingError', 'RepositoryNotFoundError'}
    return isinstance(e, (OSError, urllib.error.URLError, EOFError, ValueError)) or type(e).__name__ in names or (
        isinstance(e, RuntimeError) and ('No pretrained weights' in str(e) or 'safetensors' in str(e).lower()))


def create_model(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """`timm.create_model` with clear errors: an unknown ``bcos`` name lists the close matches; a
    ``local-dir:`` folder without a readable ``config.json``, an ``hf-hub:`` repo that cannot be
    read (offline and not cached, or not on the Hub) and timm's own pretrained weights that cannot
    be loaded (offline, not cached) raise `PretrainedWeightsError` naming them."""
    import timm

    base = model_name.split('.')[0]
    if ':' not in model_name and not timm.is_model(base):
        names = timm.list_models('bcos*')
        close = difflib.get_close_matches(base, names, n=5, cutoff=0.6)
        raise RuntimeError(f'Unknown model ({model_name}); close B-cos names: {close or names[:10]}. '
                           f'All: timm.list_models("bcos*") (after `import timm_bcos`).')
    if model_name.startswith('local-dir:'):
        _check_local_dir(model_name[len('local-dir:'):])
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except (CheckpointMismatchError, PretrainedWeightsError):
        raise
    except Exception as e:
        if not pretrained or not _is_load_error(e):
            raise
        if ':' not in model_name:  # timm's own weights (a Hub repo or a URL)
            cfg = _resolved_cfg(model_name, kwargs)
            raise PretrainedWeightsError(_unavailable(model_name, cfg, first_line(e).rstrip('.'))) from e
        if not model_name.startswith('hf-hub:'):
            raise
        repo = model_name[len('hf-hub:'):]
        offline = 'HF_HUB_OFFLINE=1 is set and it is not in the local Hub cache' if hub_offline() else 'not found'
        raise PretrainedWeightsError(f'cannot load {repo} from the Hugging Face Hub ({offline}: {type(e).__name__}). '
                                     f'Download it where there is network access (timm-bcos pull {repo} --out DIR), '
                                     f'then load local-dir:DIR.') from e


def _check_local_dir(path: str) -> None:
    config = os.path.join(path, 'config.json')
    if not os.path.isfile(config):
        raise PretrainedWeightsError(f'{config}: not found; local-dir: needs a folder with timm\'s config.json and '
                                     f'the weights (e.g. a timm-bcos train run or a published repo folder)')
    try:
        with open(config) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise PretrainedWeightsError(f'{config}: not a readable JSON config ({e})') from e


def load_model(name: str, checkpoint: Optional[str] = None, **kwargs) -> nn.Module:
    """A model with weights, for inference: a registered name (its default pretrained tag),
    ``local-dir:PATH``, ``hf-hub:ORG/NAME``, or any of them with a `checkpoint` file (safetensors)."""
    import warnings
    import timm

    if checkpoint is not None:
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
        overlay = dict(file=checkpoint)
        registered = timm.models.get_pretrained_cfg(name) if ':' not in name and timm.is_model(name) else None
        num_classes = kwargs.get('num_classes', getattr(registered, 'num_classes', None))  # the name's own default
        if num_classes is not None:
            overlay['num_classes'] = num_classes
        return create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    if ':' not in name and not timm.is_model(name.split('.')[0]):
        return create_model(name, **kwargs)  # raises, listing the close B-cos names
    # the weights of the name's default (or given) tag, not of any tag of the architecture
    has_weights = ':' in name or bool(getattr(timm.models.get_pretrained_cfg(name), 'has_weights', False))
    if not has_weights:
        warnings.warn(f'{name} has no pretrained weights: explaining a randomly initialised model', stacklevel=2)
    return create_model(name, pretrained=has_weights, **kwargs).eval()
