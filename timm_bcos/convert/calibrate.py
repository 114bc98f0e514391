"""Calibrated initial scales: every converted network starts alive.

A norm-free B-cos network is positively homogeneous: each layer multiplies the signal's size by
a factor set by its width, kernel and MaxOut, so depth compounds them. With one fixed divisor per
layer (v1's ``sqrt(fan_in) / 100``) the untrained logits of VGG underflow to 0 and those of
EfficientNet reach 1e14; v1 tuned the divisor by hand per architecture. Here each B-cos layer's
output divisor is set, in forward order, so that its output has unit RMS on a calibration batch,
then the logit temperature so that the logits have unit spread (std, net of the bias of Eq. 16).
Both are constants of the forward: dynamic linearity (Eq. 13) is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..layers import AddInverse, BatchNormUncentered2d, BcosConv2d, BcosLinear, CalibratedConstant, LogitLayer

__all__ = ['CalibrationResult', 'calibrate_scales', 'calibration_batch', 'calibration_size', 'calibration_state',
           'example_input',
           'restore_calibration_state']

_State = Tuple[CalibratedConstant, Optional[float], bool, Optional[float]]


@dataclass
class CalibrationResult:
    """What `calibrate_scales` set: the new scale of each B-cos layer (by path), the logit temperature
    (None if the model has no logit map or keeps a given temperature), layers the batch never reached,
    and layers whose output was exactly 0 (zero-initialised weights, or fed by such a layer: a
    pretrained NF-net's block before training), which keep their scale."""
    scales: Dict[str, float] = field(default_factory=dict)
    temperature: Optional[float] = None
    unreached: List[str] = field(default_factory=list)
    zero_output: List[str] = field(default_factory=list)


def _input_size(model: nn.Module) -> Optional[Tuple[int, ...]]:
    """(C, H, W) the model was built for: timm's `get_model_input_config` (a ViT built with
    ``img_size=`` takes that size, not its ``pretrained_cfg``'s), else ``pretrained_cfg['input_size']``;
    None for a model without one (a user's own network: only its author knows what it takes)."""
    size = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size')
    if not size or len(size) != 3:
        return None
    try:
        from timm.models import get_model_input_config
        built = get_model_input_config(model).get('input_size')
    except Exception:  # an older timm, or a model timm cannot describe: its pretrained_cfg
        built = None
    return tuple(built) if built and len(built) == 3 else tuple(size)


def calibration_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The (H, W) the model was built for (`_input_size`); None for a model without one."""
    size = _input_size(model)
    return size[1:] if size else None


def example_input(model: nn.Module) -> Optional[Tensor]:
    """Two seeded noise images as the unconverted model takes them (at the size it was built for,
    `_input_size`), for tracing forwards at their real shapes (two: a batch size of 1 could pass for
    a constant); None without a pretrained_cfg input size."""
    size = _input_size(model)
    if size is None:
        return None
    param = next(model.parameters(), None)
    kwargs = dict(device=param.device, dtype=param.dtype) if param is not None and param.is_floating_point() else {}
    return torch.rand(2, *size, generator=torch.Generator().manual_seed(0)).to(**kwargs)


def calibration_batch(model: nn.Module, batch_size: int = 4, seed: int = 0, in_chans: Optional[int] = None) -> Tensor:
    """Seeded uniform-noise images at the model's ``pretrained_cfg`` input size, encoded as the
    model takes them ([x, 1-x] for a 6-channel model)."""
    size = calibration_size(model)
    if size is None:
        raise ValueError(f'{type(model).__name__} has no pretrained_cfg input size to make a calibration batch at: '
                         f'pass calibration_data=<a batch of its inputs, (N, C, H, W)>')
    in_chans = in_chans or _input_channels(model)
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    if in_chans % 2 == 0:
        x = AddInverse()(torch.rand(batch_size, in_chans // 2, *size, generator=generator))
    else:
        x = torch.rand(batch_size, in_chans, *size, generator=generator)
    return x.to(device=param.device, dtype=param.dtype)


def _input_channels(model: nn.Module) -> int:
    cfg = getattr(model, 'bcos_cfg', None)
    if cfg and 'in_chans' in cfg:
        return cfg['in_chans']
    first = next((m for m in model.modules() if isinstance(m, (BcosConv2d, nn.Conv2d))), None)
    return first.in_channels if first is not None else 6


def _check_batch(x: Tensor, in_chans: int) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f'calibration_data must be a floating point tensor (N, {in_chans}, H, W), got '
                        f'{type(x).__name__}{"" if not isinstance(x, Tensor) else " of " + str(x.dtype)}')
    if x.dim() != 4 or x.shape[1] != in_chans:
        hint = (' B-cos models take the [x, 1-x] encoding of [0, 1] images: apply timm_bcos.add_inverse first.'
                if x.dim() == 4 and 2 * x.shape[1] == in_chans else '')
        raise ValueError(f'calibration_data must have shape (N, {in_chans}, H, W), got {tuple(x.shape)}.{hint}')
    if not torch.isfinite(x).all():
        raise ValueError('calibration_data contains NaN or inf')
    if not x.any():
        raise ValueError('calibration_data is all zeros: every layer output would be 0 (expected images, encoded '
                         'as the model takes them)')


def _rms(t: Tensor) -> float:
    return t.detach().double().pow(2).mean().sqrt().item()


def calibrate_scales(model: nn.Module, data: Optional[Tensor] = None, *, layers: Optional[Sequence[str]] = None,
                     temperature: bool = True, in_chans: Optional[int] = None,
                     norm_statistics: bool = False) -> CalibrationResult:
    """Set each B-cos layer's output scale (in forward order) so its output has unit RMS on `data`,
    then the logit temperature so the logits have unit std net of their bias.

    Args:
        model: a B-cos network (converted or built from B-cos layers).
        data: the model's input, (N, C, H, W); default `calibration_batch` (seeded noise images).
        layers: calibrate only the B-cos layers at or under these module paths (the others run
            as they are), e.g. a new classifier after ``reset_classifier``. Default: all.
        temperature: also set the temperature of every `LogitLayer` that has none of its own.
        in_chans: the model's input channels (default: ``bcos_cfg['in_chans']`` or the first conv's).
        norm_statistics: also re-estimate the running variances of the `BatchNormUncentered2d`
            layers in the same pass (each from the batch, on the rescaled features it normalises;
            B-cosification: the pretrained ones describe another network).

    One forward pass (eval mode, no gradients); the model's mode is restored. Layers the batch
    does not reach (a train-only auxiliary head) keep their scale and are listed in the result.
    """
    in_chans = in_chans or _input_channels(model)
    data = calibration_batch(model, in_chans=in_chans) if data is None else data
    _check_batch(data, in_chans)
    targets = {path: m for path, m in model.named_modules() if isinstance(m, (BcosConv2d, BcosLinear))
               and (layers is None or any(path == p or path.startswith(p + '.') for p in layers))}
    logits = {path: m for path, m in model.named_modules()
              if isinstance(m, LogitLayer) and temperature and (m.temperature is None or m.calibrated)}
    result = CalibrationResult()
    handles = _install_hooks(targets, logits, result)
    was_training = model.training
    norms = [m for m in model.modules() if isinstance(m, BatchNormUncentered2d) and m.track_running_stats]
    momenta = [m.momentum for m in norms] if norm_statistics else []
    try:
        with torch.no_grad():
            model.eval()
            for m in norms[:len(momenta)]:  # batch statistics, which become the running ones
                m.reset_running_stats()
                m.momentum = None
                m.train()
            model(data)
    finally:
        for h in handles:
            h.remove()
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    result.unreached = [p for p in targets if p not in result.scales and p not in result.zero_output]
    return result


def _install_hooks(targets: Dict[str, nn.Module], logits: Dict[str, LogitLayer],
                   result: CalibrationResult) -> List[torch.utils.hooks.RemovableHandle]:
    """Hooks that rescale each target's raw output to unit RMS (first call only) and set the
    temperature from the logit map's input. A classifier whose forward ends in its own logit map
    (`BcosClassifier`) is measured at that map's input, before temperature and bias."""
    handles = []

    def rescale(path: str, layer: CalibratedConstant, out: Tensor) -> Tensor:
        if path in result.scales:
            return out
        rms = _rms(out)
        if rms == 0:  # nothing to scale
            result.zero_output.append(path)
            return out
        if not math.isfinite(rms):
            raise RuntimeError(f'cannot calibrate {path or "<root>"} ({type(layer).__name__}): its output RMS on the '
                               f'calibration batch is {rms}; check the input (NaN, inf?) or pass calibration_data')
        layer.set_calibrated(layer.scale * rms)
        result.scales[path] = layer.scale
        return out / rms

    for path, layer in targets.items():
        inner = getattr(layer, 'logit', None)
        if isinstance(inner, LogitLayer):
            handles.append(inner.register_forward_pre_hook(
                lambda m, args, path=path, layer=layer: (rescale(path, layer, args[0]),) + tuple(args[1:])))
        else:
            handles.append(layer.register_forward_hook(
                lambda m, args, out, path=path, layer=layer: rescale(path, layer, out)))

    def set_temperature(logit: LogitLayer, z: Tensor) -> None:
        spread = z.detach().double().std().item() if z.numel() > 1 else float('nan')
        if not (math.isfinite(spread) and spread > 0):
            raise RuntimeError(f'cannot calibrate the logit temperature: the logits on the calibration batch have '
                               f'spread {spread} (use a batch of several images)')
        logit.set_calibrated(spread)
        result.temperature = spread

    for path, logit in logits.items():
        handles.append(logit.register_forward_pre_hook(lambda m, args: set_temperature(m, args[0])))
    return handles


def calibration_state(model: nn.Module) -> List[_State]:
    """The calibrated constants of `model` (to restore them if a conversion fails after calibration)."""
    return [(m, getattr(m, m.calibrated_attr), m.calibrated, m.uncalibrated_value)
            for m in model.modules() if isinstance(m, CalibratedConstant)]


def restore_calibration_state(state: List[_State]) -> None:
    for m, value, calibrated, uncalibrated in state:
        setattr(m, m.calibrated_attr, value)
        m.calibrated, m.uncalibrated_value = calibrated, uncalibrated
