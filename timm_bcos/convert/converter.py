"""`convert_to_bcos`: turn any timm CNN (or a user's own) into a B-cos network by rewriting its graph
(paper §3.3), in two passes driven by rule tables: the fx pass over every custom module's forward
(`timm_bcos.convert.rewrite`) and the module rules for the leaves (`timm_bcos.convert.rules`); then
the stem takes the [x, 1-x] input and the classifier gets the logit bias of Eq. 16 (`heads`).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

from torch import Tensor, nn

from ..layers import BcosConv2d, BcosLinear, DynamicGate
from .calibrate import (calibrate_scales, calibration_size, calibration_state, example_input,
                        restore_calibration_state)
from .heads import classifier_paths, convert_head, convert_stem, stem_paths
from .mixin import attach_bcos_mixin
from .rewrite import convert_tree
from .rules import ConversionContext, find_rule, is_activation, is_norm

__all__ = ['check_network', 'convert_to_bcos', 'gate_branches', 'unconverted_modules']


def gate_branches(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, module) of every branch that only feeds a gate (``bcos_cfg['gate_branches']``, e.g.
    StarNet's ``f1`` in ``act(f1(x)) * f2(x)``): part of a gate's value, detached when explaining."""
    modules = dict(model.named_modules())
    paths = (getattr(model, 'bcos_cfg', None) or {}).get('gate_branches', ())
    return [(p, modules[p]) for p in paths if p in modules]


def unconverted_modules(model: nn.Module) -> List[str]:
    """Paths of modules a B-cos network should not contain: norms, activations (outside gates),
    max-pools, and plain convolutions / linear layers. Empty for a fully converted model. Modules
    inside a `DynamicGate` or on a `gate_branches` branch are part of a gate's value: not listed."""
    gates = {id(m) for g in model.modules() if isinstance(g, DynamicGate) for m in g.modules()}
    gates |= {id(m) for _, b in gate_branches(model) for m in b.modules()}
    bad = (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Conv2d, nn.Linear)
    return [f'{path} ({type(m).__name__})' for path, m in model.named_modules()
            if id(m) not in gates and not isinstance(m, (BcosConv2d, BcosLinear))
            and (isinstance(m, bad) or is_norm(m) or is_activation(m))]


def _check_arguments(model: nn.Module, norm: str, head: str, gate_rule: str) -> None:
    if norm not in ('none', 'bnu'):
        raise ValueError(f"norm must be 'none' or 'bnu', got {norm!r}")
    if gate_rule not in ('nonlinear', 'bounded'):
        raise ValueError(f"gate_rule must be 'nonlinear' or 'bounded', got {gate_rule!r}")
    if head not in ('auto', 'conv'):
        raise ValueError(f"head must be 'auto' or 'conv', got {head!r}")
    check_network(model)


def check_network(model: nn.Module) -> None:
    """A network (not a single layer, not already B-cos, initialised) to convert."""
    if not isinstance(model, nn.Module):
        hint = f" (build it first: timm.create_model({model!r}))" if isinstance(model, str) else ''
        raise TypeError(f'convert_to_bcos expects a network (an nn.Module), got {type(model).__name__}{hint}')
    if find_rule(model) is not None:
        raise TypeError(f'convert_to_bcos expects a network, got a single {type(model).__name__}')
    if getattr(model, 'bcos_cfg', None) is not None:
        raise TypeError(f'{type(model).__name__} is already a B-cos network (it has a bcos_cfg)')
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(f'{lazy[0]} is not initialised yet (a lazy module): run one forward pass first')


def convert_to_bcos(
        model: nn.Module,
        *,
        b: float = 2.0,
        max_out: int = 2,
        norm: str = 'none',
        in_chans: int = 6,
        logit_bias: Optional[float] = None,
        logit_temperature: Optional[float] = None,
        head: str = 'auto',
        strict: bool = True,
        gate_rule: str = 'nonlinear',
        calibrate: bool = True,
        calibration_data: Optional[Tensor] = None,
) -> nn.Module:
    """Convert a CNN (any timm model or a user's own) into a B-cos network, in place.

    Args:
        model: the network; timm models keep their API (forward_features, forward_head,
            get_classifier, reset_classifier, pretrained_cfg).
        b: the exponent B of every B-cos layer (Eq. 3).
        max_out: MaxOut units per output (Eq. 17; the paper uses 2, v2 uses 1).
        norm: 'none' removes norm layers (the paper's design, with v1's output scale so the net
            trains); 'bnu' makes them bias-free and uncentered (v2), without the output scale.
        in_chans: input channels of the stem (6: the [x, 1-x] encoding of §4).
        logit_bias: the bias b of Eq. 16; default -log(C - 1), the prior 1/C under BCE.
        logit_temperature: an optional divisor of the logits (v1 uses one per model).
        head: 'auto' keeps timm's pool -> classifier (a `BcosLinear`); 'conv' puts a 1x1 B-cos conv
            before global average pooling (the v1/v2 layout).
        strict: raise `UnsupportedModuleError` for anything that would break dynamic linearity;
            False warns and leaves it.
        gate_rule: which side of a product of two input-dependent tensors is a gate (its value
            detached when explaining, so the product is part of ``W(x) x``, Eq. 13): 'bounded', a
            side from a squashing or clipped activation (sigmoid, softmax, tanh, ReLU6) or a ratio;
            'nonlinear' also the one side whose own branch has an activation or a norm (GLU-style
            gates, gMLP, FocalNet, MambaOut). Other products are refused.
        calibrate: set every B-cos layer's output scale so that its output has unit RMS, and the
            logit temperature (unless `logit_temperature` is given) so that the logits have unit
            std, on `calibration_data` (`calibrate_scales`): the converted network starts alive
            whatever its depth and widths. False keeps the fixed scales (v1's factor, or 1 with
            ``norm='bnu'``), as released v1 / v2 weights need.
        calibration_data: the model's input for calibration, (N, in_chans, H, W); default seeded
            noise images at the model's ``pretrained_cfg`` input size (`calibration_batch`). A
            model without one (a user's own network) needs this to be calibrated: without it the
            conversion warns and keeps the fixed scales.

    Returns:
        The same model object, converted, with the `BcosModelMixin` methods (explanation_mode,
        check_dynamic_linearity, explain). If the conversion fails, the model is left exactly as it
        was. With ``strict=False``, what could not be converted is listed in
        ``model.bcos_cfg['unconverted']`` and every `explain` warns that the model is not exact.
    """
    _check_arguments(model, norm, head, gate_rule)
    if calibrate and calibration_data is None and calibration_size(model) is None:
        warnings.warn(f'convert_to_bcos: {type(model).__name__} has no pretrained_cfg input size, so its scales are '
                      f'not calibrated (an uncalibrated network may start with dead or exploding logits): pass '
                      f'calibration_data=<a batch of its inputs> to calibrate, or calibrate=False', UserWarning,
                      stacklevel=2)
        calibrate = False
    ctx = ConversionContext.create(b, max_out, norm, strict, gate_rule)
    ctx.root, ctx.example_input = model, example_input(model)
    stems, classifiers = stem_paths(model), classifier_paths(model)
    classifier = classifiers[0] if classifiers else None
    before = calibration_state(model)  # B-cos layers the model had already
    try:
        convert_tree(model, '', ctx)
        convert_stem(model, stems, in_chans, ctx)
        for path in classifiers or [None]:  # a distilled model's second head too (the logits average both)
            bias = convert_head(model, path, ctx, head, logit_bias, logit_temperature)
            logit_bias = bias if path == classifier else logit_bias
        if calibrate:
            calibrate_scales(model, calibration_data, temperature=logit_temperature is None, in_chans=in_chans)
    except BaseException:
        ctx.undo()  # all or nothing: the model is as it was
        restore_calibration_state(before)
        raise
    return attach_bcos_mixin(model, dict(
        b=b, max_out=max_out, norm=norm, in_chans=in_chans, logit_bias=logit_bias,
        logit_temperature=logit_temperature, head=head, stem=stems, classifier=classifier,
        unconverted=list(ctx.skipped), gate_branches=sorted(ctx.exempt), gate_rule=gate_rule, calibrate=calibrate))
