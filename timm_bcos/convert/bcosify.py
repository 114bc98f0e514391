"""B-cosification (Arya et al., NeurIPS 2024): a pretrained network made a B-cos network that keeps
its weights, to be fine-tuned instead of trained from scratch.

The converter's rule table does the work with the pretrained weights copied into the B-cos
layers (unnormalised by default: at B=1 a B-cos layer is then the plain layer). The input
encoding is folded into the stem: the model takes [x, 1-x] of images in [0, 1], and the stem's
weights ``[W, -W] / (2 std)`` see exactly ``W (x - mean) / std``, the original's normalised input.

``bcosify(model, b=1.0, preserve_function=True)`` keeps biases, norms, activations and max-pools
and shifts the input by the encoded mean (so zero padding is the original's): it computes the
original logits, the test that the weights were carried over. The default B-cos form (B=2,
biases removed, BatchNorm uncentered, activations kept as gates ``x * g(x)``, average pools, a
1x1 B-cos conv head before global pooling, the logit bias of Eq. 16) is exactly dynamic linear
(Eq. 13) and starts close to the original.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..layers import BcosConv2d, BcosConv2dSame, BcosLinear, InputShift
from ..layers.helpers import check_b_max_out
from .calibrate import calibrate_scales, calibration_batch, calibration_size
from .converter import check_network
from .heads import classifier_path, convert_head, set_submodule, stem_paths
from .mixin import attach_bcos_mixin
from .rewrite import convert_tree
from .rules import ConversionContext, UnsupportedModuleError

__all__ = ['bcosify', 'bcosify_args', 'input_normalisation', 'set_b']


def input_normalisation(model: nn.Module, mean: Optional[Sequence[float]] = None,
                        std: Optional[Sequence[float]] = None) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The per-channel mean and std the pretrained model normalises its images with: given, or its
    ``pretrained_cfg``'s (timm's defaults when it has none)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    mean = tuple(float(v) for v in (mean if mean is not None else cfg.get('mean', IMAGENET_DEFAULT_MEAN)))
    std = tuple(float(v) for v in (std if std is not None else cfg.get('std', IMAGENET_DEFAULT_STD)))
    if len(mean) != len(std) or not all(s > 0 and math.isfinite(s) for s in std):
        raise ValueError(f'bcosify needs one mean and one positive std per image channel, got mean={mean}, std={std}')
    return mean, std


def _fold_stem(conv: BcosConv2d, mean: Tuple[float, ...], std: Tuple[float, ...], shift: bool,
               path: str) -> nn.Module:
    """The stem on [x, 1-x]: channel ``k * C + c`` of the original (C image channels; k > 0 after a
    space-to-depth) becomes channels ``k * 2C + c`` (x) and ``k * 2C + C + c`` (1 - x), with weights
    ``W / (2 std_c)`` and ``-W / (2 std_c)``."""
    chans = len(mean)
    if conv.groups != 1 or conv.in_channels % chans:
        raise UnsupportedModuleError(path, type(conv).__name__, f'the stem must be an ungrouped conv on a multiple '
                                                                f'of the {chans} image channels')
    blocks = conv.in_channels // chans
    kwargs = dict(stride=conv.stride, dilation=conv.dilation, b=conv.b, max_out=conv.max_out, scale=None,
                  normalized=conv.normalized, bias=conv.bias is not None)
    if isinstance(conv, BcosConv2dSame):
        new = BcosConv2dSame(2 * conv.in_channels, conv.out_channels, conv.kernel_size, **kwargs)
    else:
        new = BcosConv2d(2 * conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                         padding_mode=conv.padding_mode, **kwargs)
    new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
    inv_std = torch.tensor(std, dtype=conv.weight.dtype, device=conv.weight.device).repeat(blocks).reciprocal()
    w = (conv.weight * inv_std.view(1, -1, 1, 1) / 2).unflatten(1, (blocks, 1, chans))
    with torch.no_grad():
        new.weight.copy_(torch.cat([w, -w], dim=2).flatten(1, 3))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    if not shift:
        return new
    encoded_mean = torch.tensor([mean, [1 - m for m in mean]], dtype=conv.weight.dtype).flatten().repeat(blocks)
    return nn.Sequential(InputShift(encoded_mean), new)


def set_b(model: nn.Module, b: float) -> None:
    """Set the exponent B of every B-cos layer (a fine-tuning ramp from B=1 to the target B)."""
    check_b_max_out(b, 1)
    for m in model.modules():
        if isinstance(m, (BcosConv2d, BcosLinear)):
            m.b = float(b)


def recalibrate(model: nn.Module, data: Optional[Tensor] = None, in_chans: int = 6) -> None:
    """Make a B-cosified network start alive, in one pass over `data` (`calibrate_scales`): every
    B-cos layer's output to unit RMS, the BatchNorm running variances re-estimated, the logit
    temperature for unit logit spread (default data: 16 noise images; 4 give running variances
    that do not generalise: spread 50 on other images). Without it, B=2 shrinks the signal by ``|cos|`` at every
    layer and the pretrained running variances do not undo it: deep networks' logits underflow."""
    data = calibration_batch(model, batch_size=16, in_chans=in_chans) if data is None else data
    calibrate_scales(model, data, in_chans=in_chans, norm_statistics=True)


def _fold_stems(model: nn.Module, paths: Sequence[str], mean: Tuple[float, ...], std: Tuple[float, ...], shift: bool,
                ctx: ConversionContext) -> None:
    for path in paths:
        conv = model.get_submodule(path)
        if not isinstance(conv, BcosConv2d):
            raise UnsupportedModuleError(path, type(conv).__name__, 'the stem must be a convolution')
        if conv.in_channels > len(mean) and not any(type(m).__name__ == 'SpaceToDepth' for m in model.modules()):
            raise UnsupportedModuleError(path, type(conv).__name__, f'a stem on {conv.in_channels} channels: only '
                                         f"timm's SpaceToDepth (block-major) layout of image channels is known")
        set_submodule(model, path, _fold_stem(conv, mean, std, shift, path), ctx)


def _check_options(**options: str) -> None:
    allowed = dict(norm=('bnu', 'none', 'keep'), max_pool=('avg', 'keep'), activations=('keep', 'remove'),
                   head=('auto', 'conv'))
    for name, value in options.items():
        if value not in allowed[name]:
            raise ValueError(f'{name} must be one of {allowed[name]}, got {value!r}')


def _can_calibrate(model: nn.Module, data: Optional[Tensor]) -> bool:
    if data is None and calibration_size(model) is None:
        warnings.warn(f'bcosify: {type(model).__name__} has no pretrained_cfg input size, so it is not recalibrated '
                      f'(B=2 may shrink its logits towards 0): pass calibration_data=<a batch of its [x, 1-x] inputs>',
                      UserWarning, stacklevel=3)
        return False
    return True


def bcosify(
        model: nn.Module,
        *,
        b: float = 2.0,
        preserve_function: bool = False,
        keep_biases: bool = False,
        norm: str = 'bnu',
        activations: str = 'keep',
        max_pool: str = 'avg',
        head: str = 'auto',
        normalized: bool = False,
        logit_bias: Optional[float] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        strict: bool = True,
        calibrate: bool = True,
        calibration_data: Optional[Tensor] = None,
) -> nn.Module:
    """Make a pretrained network a B-cos network with its weights (B-cosification), in place.

    Args:
        model: a trained timm model (or a user's own CNN) with its weights.
        b: the exponent B of every B-cos layer; fine-tuning may ramp it (``bcos_cfg['b']`` is the
            target).
        preserve_function: the function-preserving B=1 form (needs ``b=1``): biases, norms,
            activations and max-pools kept and the input shifted by the encoded mean, so that the
            model on [x, 1-x] computes the original's logits on normalised images.
        keep_biases: keep the conv / linear biases (not dynamic linear).
        norm: 'bnu' BatchNorm (GroupNorm, LayerNorm2d) bias-free and uncentered with its learned
            scale and running variance (B-cos v2, B-cosification); 'none' removed; 'keep' as is.
        activations: 'keep' each as a gate ``x * g(x)`` with ``g`` detached when explaining (ReLU's
            mask, GELU's Φ; exact, B-cosification's choice); 'remove' (the paper's design).
        max_pool: 'avg' (B-cosification) or 'keep' (a max-pool selects an input: dynamic linear).
        head: 'auto' keeps timm's pool -> classifier (a `BcosClassifier`); 'conv' a 1x1 B-cos conv
            before global average pooling (B-cosification's torchvision models; needs the
            classifier right after timm's global pool).
        normalized: unit-norm weights (the paper); False keeps the weights' norms (B-cosification).
        logit_bias: the bias b of Eq. 16 for a Linear classifier; default -log(C - 1) (0 with
            `preserve_function`). A conv classifier (timm's ``use_conv`` heads) gets none.
        mean, std: the images' normalisation the model was trained with (default: its ``pretrained_cfg``'s).
        strict: as in `convert_to_bcos`.
        calibrate: the B-cos form only: `recalibrate` on `calibration_data` (default seeded noise
            images at the ``pretrained_cfg`` input size; a model without one needs the data).
            Layer scales and the temperature are constants: dynamic linearity is unchanged.

    Returns:
        The same model object, with the `BcosModelMixin` methods; it takes [x, 1-x] of images in
        [0, 1]. If B-cosification fails the model is left exactly as it was.
    """
    check_network(model)
    if preserve_function:
        if b != 1:
            raise ValueError(f'preserve_function=True is the B=1 form: got b={b}')
        keep_biases, norm, max_pool, activations = True, 'keep', 'keep', 'keep'
        logit_bias = 0.0 if logit_bias is None else logit_bias
    _check_options(norm=norm, max_pool=max_pool, activations=activations, head=head)
    mean, std = input_normalisation(model, mean, std)
    calibrate = calibrate and not preserve_function and _can_calibrate(model, calibration_data)
    ctx = ConversionContext.create(b, 1, norm, strict)
    ctx.scale, ctx.copy_weights, ctx.normalized = None, True, normalized
    ctx.keep_biases, ctx.activations, ctx.max_pool = keep_biases, activations, max_pool
    stems, classifier = stem_paths(model), classifier_path(model)
    try:
        convert_tree(model, '', ctx)
        _fold_stems(model, stems, mean, std, preserve_function, ctx)
        linear_head = classifier is not None and isinstance(model.get_submodule(classifier), BcosLinear)
        logit_bias = convert_head(model, classifier, ctx, head, logit_bias if linear_head else None, None)
        if calibrate and not preserve_function:
            recalibrate(model, calibration_data, 2 * len(mean))
    except BaseException:
        ctx.undo()
        raise
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    return attach_bcos_mixin(model, dict(
        b=b, max_out=1, norm=norm, in_chans=2 * len(mean), logit_bias=logit_bias, logit_temperature=None, head=head,
        stem=[f'{p}.1' if preserve_function else p for p in stems], classifier=classifier,
        unconverted=list(ctx.skipped), gate_branches=sorted(ctx.exempt), gate_rule=ctx.gate_rule, calibrate=False,
        bcosified=dict(
            architecture=arch, preserve_function=preserve_function, keep_biases=keep_biases, activations=activations,
            max_pool=max_pool, normalized=normalized, mean=list(mean), std=list(std))))


def bcosify_args(model: nn.Module) -> Dict[str, Any]:
    """The `bcosify` arguments that rebuild `model`'s structure from its source architecture (JSON
    values; no calibration: the weights, scales included, come from a checkpoint). The ``bcosify``
    model argument of ``bcos_<arch>`` / ``bcosified`` (`timm_bcos.models`) takes them."""
    cfg = getattr(model, 'bcos_cfg', None) or {}
    if 'bcosified' not in cfg:
        raise ValueError(f'{type(model).__name__} is not a B-cosified model (timm_bcos.bcosify)')
    options = {k: v for k, v in cfg['bcosified'].items() if k != 'architecture'}
    return dict(b=float(cfg['b']), norm=cfg['norm'], head=cfg['head'], logit_bias=cfg['logit_bias'],
                strict=not cfg.get('unconverted'), **options)
