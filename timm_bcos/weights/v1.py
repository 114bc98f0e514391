"""Loading the paper's own trained models (B-cos v1, github.com/moboehle/B-cos) into timm_bcos models.

v1 (CVPR 2022) released ImageNet and CIFAR-10 checkpoints (``model_url`` in
``experiments/{Imagenet,CIFAR10}/bcos/experiment_parameters.py``). Each one is the state dict of

    nn.Sequential(network, MyAdaptiveAvgPool2d((1, 1)), FinalLayer(bias=logit_bias, norm=logit_temperature))

(``experiments/*/bcos/model.py``), so ImageNet keys start with ``0.``; the pooling and ``FinalLayer``
(``x / logit_temperature + logit_bias``, ``modules/utils.py``) have no state. Every convolution is v1's
``BcosConv2d`` (``modules/bcosconv2d.py``: B=2, MaxOut 2, no bias, unit-norm weights in a child
``linear``, output divided by ``sqrt(k_h k_w C_in) / scale_fact``); norms and ReLUs are deleted,
max-pools are average pools with the same kernel/stride/padding, and the classifier is a 1x1 B-cos
conv *before* global average pooling. Per model (``models/bcos/*.py`` and the experiment files):

==========================  ===========  ========  ===========  ====================================
tag                         top-1 (%)    scale_f.  temperature  v1 experiment / notes
==========================  ===========  ========  ===========  ====================================
densenet121.v1_in1k         73.3         100       1e-3         densenet_121 (100 epochs)
densenet121.v1_in1k_long    74.4         100       1e-3         densenet_121_cossched (200 ep., "+")
resnet34.v1_in1k            71.7         100       10           resnet_34
vgg11.v1_in1k               69.6         1000      0.1          vgg_11 (head conv 7x7, padding 3)
inception_v3.v1_in1k        75.4         200       1            inception_v3 (299 px, aux head)
simple_cifar.v1_cifar10_bB  93.5 .. 92.4 explicit  10**T        9L-M2-B{1,...,2.5} (CIFAR-10)
==========================  ===========  ========  ===========  ====================================

ImageNet logit bias ``log(0.01/0.99)``, CIFAR-10 ``log(0.1/0.9)``. The CIFAR nets use one explicit
scale ``10**(-2 + 1.5 (2.5 - B))`` for every layer (not ``scale_fact``).

`create_v1_model` builds each from timm + `convert_to_bcos` (``head='conv'``, v1's logit bias and
temperature), sets v1's per-layer scales on the converted layers, and for VGG first gives timm's
head v1's shape (`prepare_vgg_head`: the 7x7 head conv padded by 3, no upsampling; the same
head as v2). The CIFAR nets are `BcosSimpleNet`. `map_v1_state_dict` renames and validates a v1
state dict; it can be timm's ``pretrained_filter_fn``. Every tag is registered with timm as
``bcos_<tag>`` (`timm_bcos.models.bcos_models`): ``timm.create_model('bcos_densenet121.v1_in1k', pretrained=True)``.

Numerics: for B=2 and B=1 our layer computes v1's function. For other B, v1 adds 1e-6 to ``|cos|``
before the power (``(|cos| + 1e-6)^(B-1)``, its "unnecessary doubling of stabilising term"); ours
uses ``|cos|^(B-1)``, so the CIFAR B=1.25/1.5/1.75/2.25/2.5 nets differ from v1 by a relative
``~(B-1) * 1e-6 / |cos|`` per layer (random 9-layer nets: ~1e-4 relative in the logits;
tests/test_v1_weights.py::test_cifar_logits_are_v1s). Matching it exactly needs a ``cos_eps``
option on `BcosConv2d`.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._utils import hub_offline, url_cache_dir
from ..convert import convert_to_bcos
from ..layers import BcosConv2d, BcosLinear, LogitLayer, calibration_keys
from ..models.builder import PretrainedWeightsError
from ..models.simple_cifar import BcosSimpleNet
from .reference import (LINEAR_SUFFIX, StateDictMismatchError, check_tensor_dict, class_count_hint, classifier_key,
                        compare_mapped_keys, has_reference_vgg_head, list_keys, mismatch_message, model_family,
                        prepare_vgg_head, rename_keys, rename_reference_keys, strip_linear, to_our_layout)

__all__ = ['V1_BASE_URL', 'V1_CIFAR_BS', 'V1_LOGIT_BIAS_CIFAR10', 'V1_LOGIT_BIAS_IMAGENET', 'V1_MODELS',
           'V1StateDictError', 'create_v1_model', 'guess_v1_family', 'load_v1_state_dict', 'map_v1_state_dict',
           'set_v1_scales', 'v1_cifar_settings', 'v1_weights_file']

V1_BASE_URL = 'https://nextcloud.mpi-klsb.mpg.de/index.php/s'
V1_LOGIT_BIAS_IMAGENET = math.log(0.01 / 0.99)  # experiments/Imagenet/bcos/experiment_parameters.py default_config
V1_LOGIT_BIAS_CIFAR10 = math.log(0.1 / 0.9)  # experiments/CIFAR10/bcos/experiment_parameters.py default_config
V1_MAX_OUT = 2  # BcosConv2d(max_out=2) default (ImageNet nets); "max_out": 2 in the CIFAR ablation

# v1's BcosConv2d scale divisor: scale_fact=100 by default, 1000 in models/bcos/vgg.py, 200 in
# models/bcos/inception.py (every conv, incl. fc and AuxLogits.fc).
_SCALE_FACTORS = {'densenet': 100.0, 'resnet': 100.0, 'vgg': 1000.0, 'inception': 200.0}
_TEMPERATURES = {'densenet': 1e-3, 'resnet': 10.0, 'vgg': 0.1, 'inception': 1.0}


def _imagenet(family: str, timm_arch: str, experiment: str, token: str, top1: float, file_stem: str,
              **extra) -> Dict[str, Any]:
    # test_time_transforms: Resize(256), CenterCrop(224) (bilinear), then AddInverse (no mean/std)
    cfg = dict(
        family=family, timm_arch=timm_arch, dataset='imagenet-1k', num_classes=1000, v1_experiment=experiment,
        v1_config='experiments/Imagenet/bcos/experiment_parameters.py',
        convert_kwargs=dict(b=2.0, max_out=V1_MAX_OUT, norm='none', in_chans=6, head='conv',
                            logit_bias=V1_LOGIT_BIAS_IMAGENET, logit_temperature=_TEMPERATURES[family]),
        scale_factor=_SCALE_FACTORS[family], url=f'{V1_BASE_URL}/{token}/download', top1=top1,
        file_name=f'bcos_v1_{file_stem}-{token}.pth', input_size=(6, 224, 224), crop_pct=0.875,
        interpolation='bilinear')
    cfg.update(extra)
    return cfg


# B -> (logit temperature exponent T, nextcloud token, Tab. 1 accuracy): experiments/CIFAR10/bcos/
# experiment_parameters.py (ablation_exps, model_urls); accuracies from the paper's Tab. 1.
_CIFAR = {1.0: (-3, 'q8cRRojXZ2WNWbS', 93.5), 1.25: (-3, 'oX6H7jQiSN2dfWJ', 93.8), 1.5: (-2, '3LxnBCarS8Lpq5b', 93.7),
          1.75: (1, 'XLwEnaKr9bYQJaN', 93.7), 2.0: (2, 'mksX2CJMCDQbMYb', 93.2), 2.25: (2, 'qFsqLPdHLQyNHwH', 92.6),
          2.5: (3, 'XwEAFrPSEYJ2C79', 92.4)}


#: The B values of v1's CIFAR-10 ablation (paper Tab. 1).
V1_CIFAR_BS = tuple(_CIFAR)


def v1_cifar_settings(b: float) -> Dict[str, float]:
    """v1's CIFAR-10 settings for `B`: ``b``, the layer scale ``10**(-2 + 1.5 (2.5 - B))`` (one fixed
    output divisor for every layer) and the logit temperature ``10**T`` of its experiment file."""
    b = float(b)
    if b not in _CIFAR:
        raise ValueError(f'no v1 CIFAR-10 settings for B={b}; known: {sorted(_CIFAR)}')
    return dict(b=b, scale=10 ** (-2 + 1.5 * (2.5 - b)), logit_temperature=10.0 ** _CIFAR[b][0])


def _b_name(b: float) -> str:
    return f'{b:g}'.replace('.', '_')


def _cifar(b: float) -> Dict[str, Any]:
    _, token, top1 = _CIFAR[b]
    settings = v1_cifar_settings(b)
    return dict(
        family='simple', timm_arch=None, dataset='cifar10', num_classes=10, v1_experiment=f'9L-M2-B{b:g}',
        v1_config='experiments/CIFAR10/bcos/experiment_parameters.py',
        # BcosSimpleNet defaults are v1's default_config: out_c 64,64,128,128,128,256,256,256 (+ classes),
        # 3x3 kernels with padding 1, strides 1,1,2,1,1,2,1,1, then a 1x1 classifier conv, 6-channel input.
        simple_kwargs=dict(settings, max_out=V1_MAX_OUT, in_chans=6, logit_bias=V1_LOGIT_BIAS_CIFAR10),
        url=f'{V1_BASE_URL}/{token}/download', top1=top1, file_name=f'bcos_v1_cifar10_9l_m2_b{_b_name(b)}-{token}.pth',
        input_size=(6, 32, 32), crop_pct=1.0, interpolation='bilinear')


V1_MODELS: Dict[str, Dict[str, Any]] = {
    'densenet121.v1_in1k': _imagenet('densenet', 'densenet121', 'densenet_121', 'LW2HsNDzAzaaaDH', 73.3,
                                     'densenet_121'),
    'densenet121.v1_in1k_long': _imagenet(
        'densenet', 'densenet121', 'densenet_121_cossched', 'G8kdm73qWn4L8Lg', 74.4, 'densenet_121_cossched',
        notes='"training+" of Tab. 2: 200 epochs, batch 128, warm-up and cosine schedule'),
    'resnet34.v1_in1k': _imagenet('resnet', 'resnet34', 'resnet_34', 'mYe6TggQsDymZbk', 71.7, 'resnet_34'),
    'vgg11.v1_in1k': _imagenet('vgg', 'vgg11', 'vgg_11', 'kEHgFSSKMEdeA5N', 69.6, 'vgg_11',
                               notes="timm's vgg11 with pre_logits.fc1 padding=3 and no upsampling to 7x7 "
                                     "(v1's head, see prepare_vgg_head)"),
    'inception_v3.v1_in1k': _imagenet(
        'inception', 'inception_v3', 'inception_v3', 'QSEo6QSNgPZqNfi', 75.4, 'inception_v3',
        input_size=(6, 299, 299), crop_pct=299 / 320,  # test_time_transforms: Resize(320), CenterCrop(299)
        notes="v1 trained with an auxiliary head (AuxLogits, training only); map_v1_state_dict checks "
              "and drops its weights"),
    **{f'simple_cifar.v1_cifar10_b{_b_name(b)}': _cifar(b) for b in _CIFAR},
}


class V1StateDictError(StateDictMismatchError):
    """A B-cos v1 state dict that does not fit the model (see `StateDictMismatchError`)."""


# --- building ----------------------------------------------------------------------------------

def set_v1_scales(model: nn.Module, scale_factor: float) -> nn.Module:
    """Set v1's output divisor ``sqrt(k_h k_w C_in) / scale_factor`` on every B-cos layer of `model`.

    `convert_to_bcos` uses v1's default ``scale_fact=100``; v1's VGG uses 1000 and its Inception 200.
    These are fixed scales: a calibration is undone first.
    """
    for m in model.modules():
        if isinstance(m, (BcosConv2d, BcosLinear)):
            m.reset_calibration()
        if isinstance(m, BcosConv2d):
            m.scale = math.sqrt(m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]) / scale_factor
        elif isinstance(m, BcosLinear):
            m.scale = math.sqrt(m.in_features) / scale_factor
    if isinstance(getattr(model, 'bcos_cfg', None), dict):
        model.bcos_cfg['scale_factor'] = float(scale_factor)
    return model


def create_v1_model(tag: str, num_classes: Optional[int] = None, state_dict: Optional[Dict[str, Tensor]] = None,
                    **kwargs) -> nn.Module:
    """Build v1's architecture for the checkpoint `tag` (a key of `V1_MODELS`).

    ImageNet: timm's base architecture (VGG: with `prepare_vgg_head`), converted with v1's
    settings and given v1's per-layer scales; CIFAR-10: `BcosSimpleNet` with v1's B, scale and
    logit temperature. ``kwargs`` named like one of the tag's settings (``convert_kwargs`` and
    ``scale_factor``; CIFAR: ``simple_kwargs``) override it, the rest go to ``timm.create_model``
    (CIFAR: `BcosSimpleNet`, e.g. ``widths``). ``state_dict``: an optional v1 state dict
    (``torch.load`` of the release file), mapped with `map_v1_state_dict` and loaded strictly.
    """
    if tag not in V1_MODELS:
        raise KeyError(f'unknown B-cos v1 checkpoint {tag!r}; known: {sorted(V1_MODELS)}')
    cfg = V1_MODELS[tag]
    num_classes = cfg['num_classes'] if num_classes is None else num_classes
    if cfg['family'] == 'simple':
        settings = dict(cfg['simple_kwargs'], **kwargs)
        model = BcosSimpleNet(num_classes=num_classes, **settings)
        model.bcos_cfg['scale'] = settings['scale']
    else:
        import timm

        settings = dict(cfg['convert_kwargs'], scale_factor=cfg['scale_factor'])
        settings.update({k: kwargs.pop(k) for k in list(kwargs) if k in settings})
        scale_factor = settings.pop('scale_factor')
        model = timm.create_model(cfg['timm_arch'], pretrained=False, num_classes=num_classes, **kwargs)
        if cfg['family'] == 'vgg':
            prepare_vgg_head(model)
        convert_to_bcos(model, calibrate=False, **settings)  # v1's exact fixed scales
        set_v1_scales(model, scale_factor)
    model.bcos_cfg['v1_tag'] = tag
    if state_dict is not None:
        load_v1_state_dict(model, state_dict)
    return model


def load_v1_state_dict(model: nn.Module, state_dict: Dict[str, Tensor]) -> nn.Module:
    """``model.load_state_dict(map_v1_state_dict(state_dict, model), strict=True)``."""
    model.load_state_dict(map_v1_state_dict(state_dict, model), strict=True)
    return model


def v1_weights_file(tag: str, cache_dir: Optional[str] = None, download: bool = True, progress: bool = True) -> str:
    """Local path of `tag`'s release file, downloaded on first use under its unique ``file_name``.

    Every v1 URL ends in ``/download``, so timm's / torch's URL cache (keyed by the URL's basename)
    would store all of them as ``download``; this keeps one file per checkpoint in timm's cache
    directory (``$TORCH_HOME/hub/checkpoints``) or `cache_dir`. Raises `PretrainedWeightsError`
    when the file is absent and cannot be fetched (``download=False``, ``HF_HUB_OFFLINE=1`` or no
    network).
    """
    if tag not in V1_MODELS:
        raise KeyError(f'unknown B-cos v1 checkpoint {tag!r}; known: {sorted(V1_MODELS)}')
    cfg = V1_MODELS[tag]
    if cache_dir is None:
        cache_dir = url_cache_dir()
    path = os.path.join(cache_dir, cfg['file_name'])
    if os.path.exists(path):
        return path
    offline = hub_offline()
    if not download or offline:
        raise PretrainedWeightsError(
            f'B-cos v1 weights for {tag} are not in the cache ({path}) and '
            f'{"HF_HUB_OFFLINE=1 is set" if offline else "download=False"}: fetch {cfg["url"]} to that path '
            f'where there is network access, or pass a local copy with pretrained_cfg_overlay=dict(file=PATH).')
    os.makedirs(cache_dir, exist_ok=True)
    try:
        torch.hub.download_url_to_file(cfg['url'], path, progress=progress)
    except Exception as e:
        raise PretrainedWeightsError(f'cannot download the B-cos v1 weights for {tag} from {cfg["url"]}: '
                                     f'{type(e).__name__}: {e}') from e
    return path


# --- key mapping -------------------------------------------------------------------------------

# v1's Inception3(aux_logits=True) auxiliary head: used for the training loss only (its forward
# runs it under `if self.training` and stores the result); timm's InceptionV3(aux_logits=True)
# returns (logits, aux) in eval too, so we build without it and drop these (after checking them).
_AUX_PREFIX = 'AuxLogits.'


def _expected_config(model: nn.Module, family: str) -> Tuple[Dict[str, Any], Optional[str]]:
    """The v1 settings the model must have: its tag's, else its family's (ImageNet families only)."""
    tag = model.bcos_cfg.get('v1_tag')
    if tag is not None and tag in V1_MODELS and V1_MODELS[tag]['family'] == family:
        cfg = V1_MODELS[tag]
    else:
        cfg = next((c for c in V1_MODELS.values() if c['family'] == family), None)
        tag = None
    if family == 'simple':
        kw = cfg['simple_kwargs']
        expected = dict(b=kw['b'], max_out=kw['max_out'], norm='none', in_chans=kw['in_chans'], head='conv',
                        logit_bias=kw['logit_bias'], logit_temperature=kw['logit_temperature'], scale=kw['scale'])
        if tag is None:  # B, scale and temperature differ per CIFAR checkpoint: only the structure is known
            expected = {k: v for k, v in expected.items() if k in ('max_out', 'norm', 'in_chans', 'head')}
        return expected, tag
    return dict(cfg['convert_kwargs'], scale_factor=cfg['scale_factor']), tag


def _check_model_config(model: nn.Module, family: str) -> None:
    """The model must be built like v1 (keys alone do not show B, scales or where the classifier sits)."""
    cfg = getattr(model, 'bcos_cfg', None)
    if cfg is None:
        raise V1StateDictError(f'{type(model).__name__} is not a converted B-cos model: build it with '
                               f'create_v1_model(tag)')
    expected, tag = _expected_config(model, family)
    what = f'v1 checkpoint {tag}' if tag else f'B-cos v1 {family}'
    wrong = {}
    for key, value in expected.items():
        if key in ('scale_factor', 'scale'):  # checked layer by layer below
            continue
        have = cfg.get(key)
        same = (have is None and value is None) or (have is not None and value is not None and (
            math.isclose(have, value, rel_tol=1e-12) if isinstance(value, float) else have == value))
        if not same:
            wrong[key] = (have, value)
    logits = [m for m in model.modules() if isinstance(m, LogitLayer)]
    if len(logits) != 1 or any(not math.isclose(getattr(logits[0], attr) or 0.0, expected.get(k) or 0.0, rel_tol=1e-12)
                               for attr, k in (('bias', 'logit_bias'), ('temperature', 'logit_temperature'))
                               if k in expected):
        wrong['LogitLayer'] = ([(m.bias, m.temperature) for m in logits],
                               (expected.get('logit_bias'), expected.get('logit_temperature')))
    bad_scales = []
    for name, m in model.named_modules():
        if not isinstance(m, (BcosConv2d, BcosLinear)):
            continue
        if 'scale_factor' in expected:
            fan_in = (m.in_features if isinstance(m, BcosLinear)
                      else m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
            want = math.sqrt(fan_in) / expected['scale_factor']
        elif 'scale' in expected:
            want = expected['scale']
        else:
            continue
        if not math.isclose(m.scale, want, rel_tol=1e-9):
            bad_scales.append(f'{name}: {m.scale:.6g} (v1: {want:.6g})')
    if bad_scales:
        wrong['scale'] = (list_keys('layers', bad_scales), expected.get('scale_factor', expected.get('scale')))
    if family == 'vgg' and not has_reference_vgg_head(model):
        wrong['vgg head'] = ('timm ConvMlp', "v1's: fc1 padding=3, no upsampling (prepare_vgg_head)")
    if wrong:
        details = '; '.join(f'{k}: model {have!r}, v1 {want!r}' for k, (have, want) in wrong.items())
        raise V1StateDictError(f'the model is not built like {what}: {details}. Build it with '
                               f'create_v1_model({tag or "<tag>"!r}) (one of {sorted(V1_MODELS)}).')


def _strip_prefix(keys: Sequence[str], family: str) -> Dict[str, str]:
    """Checkpoint key -> key inside v1's network: drop DataParallel's ``module.`` and, for ImageNet,
    the ``0.`` of the ``nn.Sequential(network, pool, FinalLayer)`` the release files were saved from."""
    out = {k: k[len('module.'):] if k.startswith('module.') else k for k in keys}
    if family != 'simple' and out and all(v.startswith('0.') for v in out.values()):
        out = {k: v[2:] for k, v in out.items()}
    return out


def _simple_name(key: str, n_features: int) -> str:
    """A key of v1's CIFAR net (``nn.Sequential`` of 8 convs and the classifier conv) -> ours."""
    m = re.match(r'^(\d+)\.weight$', key)
    if not m:
        return key
    i = int(m.group(1))
    return f'features.{i}.weight' if i < n_features else ('classifier.weight' if i == n_features else key)


def _our_names(inner: Dict[str, str], family: str, model: nn.Module, state_dict: Dict[str, Tensor]) -> Dict[str, str]:
    """Checkpoint key -> ours, from its key inside v1's network (`inner`, ``.linear`` already stripped)."""
    if family == 'simple':
        return {source: _simple_name(key, len(model.features)) for source, key in inner.items()}
    shapes = {key: tuple(state_dict[source].shape) for source, key in inner.items()}
    names = rename_reference_keys(shapes, family, model)
    return {source: names[key] for source, key in inner.items()}


def _aux_shapes(model: nn.Module, max_out: int) -> Dict[str, Tuple[int, ...]]:
    """v1's InceptionAux (768 -> 128 (1x1) -> 768 (5x5) -> classes (1x1)), after renaming."""
    c = model.num_classes
    return {'AuxLogits.conv0.conv.weight': (128 * max_out, 768, 1, 1),
            'AuxLogits.conv1.conv.weight': (768 * max_out, 128, 5, 5),
            'AuxLogits.fc.weight': (c * max_out, 768, 1, 1)}


def map_v1_state_dict(state_dict: Dict[str, Tensor], model: nn.Module, *,
                      allow_new_head: bool = False) -> Dict[str, Tensor]:
    """Rename a B-cos v1 state dict to the keys of `model` (built by `create_v1_model`) and validate it.

    Accepted: the release files (ImageNet keys ``0.<network key>``, CIFAR ``<layer index>.linear.weight``),
    a v1 network's own ``state_dict()`` (no ``0.``), either with DataParallel's ``module.``, or a
    state dict already in our format (no ``.linear.weight`` keys: only validated). Renaming:
    ``<conv>.linear.weight`` -> ``<conv>.weight``; the classifier conv ``classifier``/``fc`` ->
    ``classifier.fc``/``fc.fc`` (our `BcosConvClassifier`); VGG ``features.i`` -> timm's index
    of the same conv, ``classifier.0/1/2`` -> ``pre_logits.fc1``/``pre_logits.fc2``/``head.fc.fc``;
    CIFAR ``0..7`` -> ``features.0..7``, ``8`` -> ``classifier``. MaxOut units are reordered from
    v1's row ``o * 2 + m`` to ours (`from_reference_layout`). Inception's ``AuxLogits.*`` (training
    only) are shape-checked and dropped.

    Every key must be used and every model key provided, with equal shapes, and the model must be
    built with the checkpoint's B, MaxOut, scales, logit bias and temperature; otherwise
    `V1StateDictError` (a ValueError) names the unexpected, missing and mis-shaped keys (our names)
    or the settings. Usable as timm's ``pretrained_filter_fn(state_dict, model)``.

    ``allow_new_head=True`` (fine-tuning a model built for another class count) drops the
    checkpoint's classifier when only its class count differs; everything else is still strict.
    """
    check_tensor_dict(state_dict, V1StateDictError)
    family = model_family(model, ('densenet', 'resnet', 'vgg', 'inception', 'simple'), V1StateDictError,
                          'B-cos v1 checkpoints exist for timm DenseNet, ResNet, VGG and Inception-v3 models and '
                          'BcosSimpleNet')
    _check_model_config(model, family)
    optional = calibration_keys(model)  # reference checkpoints have fixed scales: none of these
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in optional}
    inner = _strip_prefix(list(state_dict), family)
    reference_format = any(k.endswith(LINEAR_SUFFIX) for k in inner.values())
    if reference_format:
        inner = {source: strip_linear(key) for source, key in inner.items()}
    aux = {key: source for source, key in inner.items() if family == 'inception' and key.startswith(_AUX_PREFIX)}
    inner = {source: key for source, key in inner.items() if key not in aux}
    names = _our_names(inner, family, model, state_dict) if reference_format else inner
    mapped, sources = rename_keys(state_dict, names, V1StateDictError)
    unexpected, missing, mismatched = compare_mapped_keys(mapped, sources, expected, classifier_key(family, model),
                                                          allow_new_head)
    if aux:
        _check_aux(aux, state_dict, model, allow_new_head, unexpected, missing, mismatched)
    if unexpected or missing or mismatched:
        raise V1StateDictError(_mismatch_message(state_dict, model, family, unexpected, missing, mismatched, sources,
                                                 expected), unexpected, missing, mismatched)
    return to_our_layout(mapped, model) if reference_format else mapped


def _check_aux(aux: Dict[str, str], state_dict: Dict[str, Tensor], model: nn.Module, allow_new_head: bool,
               unexpected: List[str], missing: List[str], mismatched: List[str]) -> None:
    """Inception's auxiliary head (training only, not in our model): its keys and shapes must be v1's."""
    aux_shapes = _aux_shapes(model, model.bcos_cfg['max_out'])
    unexpected += sorted(f'{k} (checkpoint {aux[k]!r})' for k in aux if k not in aux_shapes)
    if set(aux) & set(aux_shapes):
        missing += sorted(f'{k} (v1 auxiliary head)' for k in set(aux_shapes) - set(aux))
    for k in sorted(set(aux) & set(aux_shapes)):
        shape, want = tuple(state_dict[aux[k]].shape), aux_shapes[k]
        if shape != want and not (k == 'AuxLogits.fc.weight' and allow_new_head and shape[1:] == want[1:]):
            mismatched.append(f'{k} (checkpoint {aux[k]!r}, v1 auxiliary head): {shape} vs {want}')


# --- errors ------------------------------------------------------------------------------------

def guess_v1_family(state_dict: Dict[str, Tensor]) -> Optional[str]:
    """'densenet', 'resnet', 'vgg', 'inception' or 'simple' for a v1 (or already mapped) state dict."""
    keys = [k[len('module.'):] if k.startswith('module.') else k for k in state_dict]
    if keys and all(re.match(r'^\d+\.linear\.weight$', k) for k in keys):
        return 'simple'  # the CIFAR release files: nn.Sequential of B-cos convs
    if keys and all(k.startswith('0.') for k in keys):
        keys = [k[2:] for k in keys]
    joined = ' '.join(keys)
    for family, marker in (('densenet', '.denseblock'), ('inception', 'Mixed_'), ('resnet', 'layer1.'),
                           ('vgg', 'classifier.0.'), ('vgg', 'pre_logits.'), ('simple', 'classifier.weight')):
        if marker in joined:
            return family
    return None


def _mismatch_message(state_dict, model, family, unexpected, missing, mismatched, sources, expected) -> str:
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    tag = model.bcos_cfg.get('v1_tag')
    hints: List[Optional[str]] = []
    ckpt_family = guess_v1_family(state_dict)
    if ckpt_family != family:
        hints.append(f'the checkpoint looks like a B-cos v1 {ckpt_family or "<unknown architecture>"}, '
                     f'the model is a {family}')
    hints.append(class_count_hint(state_dict, sources, expected, classifier_key(family, model),
                                  model.bcos_cfg['max_out']))
    return mismatch_message(f'B-cos v1 checkpoint does not fit {arch}{f" ({tag})" if tag else ""}', unexpected,
                            missing, mismatched, hints)
