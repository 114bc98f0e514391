"""The attribution methods of the pointing game (paper §4, Fig. 5/6), one uniform call each.

`ATTRIBUTIONS` maps every method name to an `AttributionMethod`, called as captum's methods are:
``ATTRIBUTIONS[name](model, inputs, targets, settings)`` with the model's own (encoded) input
(N, C, H, W), the (N, T) classes to explain and the shared `AttributionSettings`; it returns an
`Attribution`: (N, T, H, W) maps (summed over the input channels) and, for ``bcos``, the Eq. 13
error. `attribute` (one method) and the pointing game look the method up there.

Methods (`METHODS`): ``bcos``, the model-inherent contributions ``sum_c W(x) * x`` (Eq. 15, via
`timm_bcos.explain`; B-cos models only), and post-hoc methods through captum: ``grad`` (the plain
input gradient, signed: Saliency with ``abs=False``, as v1's "Grad"), ``ixg`` (InputXGradient),
``ig`` (IntegratedGradients, zero baseline), ``deeplift`` (DeepLift, zero baseline), ``gradcam``
(LayerGradCam on the model's feature extractor ``model.features``, i.e. the last convolution block
before the classifier, ReLU'd and upsampled to the input with nearest neighbours) and ``occlusion``
(captum's Occlusion semantics, computed for all of a grid's classes with one forward pass per
window position: see `occlusion`). Post-hoc methods see the model's own input: the 6-channel
encoding [x, 1-x] for B-cos models (perturbation baseline 0 in that encoding: a removed patch
contributes nothing to a B-cos network), RGB in [0, 1] for conventional ones.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..explain import explain
from .inputs import encode_input, is_bcos, model_device

__all__ = ['ATTRIBUTIONS', 'METHODS', 'METHOD_LABELS', 'PERTURBATION', 'POST_HOC', 'Attribution', 'AttributionMethod',
           'AttributionSettings', 'attribute', 'default_methods', 'gradcam_layer', 'occlusion', 'posthoc_copy',
           'run_method']


@dataclass(frozen=True)
class AttributionSettings:
    """The settings shared by all methods (each uses the ones it needs).

    grid: tiles per side (sets the default occlusion window); batch_size: images per
    forward/backward pass (post-hoc methods explain T copies of each image); ig_steps:
    IntegratedGradients' steps (Gauss-Legendre, captum's default rule); occlusion_window,
    occlusion_stride: in pixels, default tile // 2 and tile // 4; gradcam_layer: module name for
    GradCAM (default: ``model.features``).
    """

    grid: Optional[int] = None
    batch_size: int = 64
    ig_steps: int = 20
    occlusion_window: Optional[int] = None
    occlusion_stride: Optional[int] = None
    gradcam_layer: Optional[str] = None

    def occlusion_geometry(self, tile: int) -> Tuple[int, int]:
        """Occlusion's window and stride in pixels for a tile size: the given ones, else half and a quarter tile."""
        return self.occlusion_window or max(1, tile // 2), self.occlusion_stride or max(1, tile // 4)


@dataclass
class Attribution:
    """A method's result: ``maps`` (N, T, H, W) float32 on the CPU; ``eq13_error``: for ``bcos``, the
    largest relative Eq. 13 error of the batch's explanations (`Explanation.check`), else None."""

    maps: Tensor
    eq13_error: Optional[float] = None


AttributionFn = Callable[[nn.Module, Tensor, Tensor, AttributionSettings], Attribution]


@dataclass(frozen=True)
class AttributionMethod:
    """An entry of `ATTRIBUTIONS`: ``method(model, inputs, targets, settings) -> Attribution``.

    `post_hoc`: runs on a `posthoc_copy` of the model (captum's hooks), not on the model itself;
    `perturbation`: a perturbation method, whose maps are not smoothed (paper §4).
    """

    label: str
    fn: AttributionFn
    post_hoc: bool = True
    perturbation: bool = False

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor, settings: AttributionSettings) -> Attribution:
        return self.fn(model, inputs, targets, settings)


def _captum():
    """captum.attr (an optional dependency: timm-bcos[eval])."""
    try:
        import captum.attr
    except ImportError as e:
        raise ImportError('the post-hoc attribution methods use captum: pip install captum, or timm-bcos[eval] '
                          '(or --methods bcos)') from e
    return captum.attr


def posthoc_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy for captum: frozen parameters, no in-place ReLUs (captum's hooks need that).

    Imports captum first: a clear error when it is missing, and its import time is not booked to
    the first method that uses it.
    """
    _captum()
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    for mod in m.modules():
        if isinstance(mod, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid)) \
                and getattr(mod, 'inplace', False):
            mod.inplace = False
    return m


def gradcam_layer(model: nn.Module, name: Optional[str]) -> Tuple[str, nn.Module]:
    """GradCAM's layer: `name`, else ``model.features`` (the conv blocks before the classifier), else
    the last convolution that is not the classifier."""
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            raise ValueError(f'unknown gradcam layer {name!r}')
        return name, modules[name]
    if isinstance(getattr(model, 'features', None), nn.Module):
        return 'features', model.features
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    head = cfg.get('classifier') or ''
    head = (head,) if isinstance(head, str) else tuple(head)
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) or type(m).__name__.startswith('BcosConv')]
    convs = [n for n in convs if not any(n == h or n.startswith(h + '.') for h in head if h)]
    if not convs:
        raise ValueError('no convolution for GradCAM found: pass gradcam_layer=NAME')
    return convs[-1], modules[convs[-1]]


def occlusion(model: nn.Module, inputs: Tensor, targets: Tensor, window: int, stride: int,
              batch_size: int = 64) -> Tensor:
    """Occlusion attributions of every target, summed over channels: (N, T, H, W).

    Exactly captum's ``Occlusion(model).attribute(x, target, sliding_window_shapes=(C, window,
    window), strides=(C, stride, stride), baselines=0).sum(1)`` for each (image, target), i.e. each
    pixel gets the mean logit drop over the windows that cover it (times C: the sum over channels),
    but with one forward pass per window position for all of an image's targets instead of one per
    target. `inputs` are the model's inputs (already encoded).
    """
    n, c, h, w = inputs.shape
    if not (1 <= window <= min(h, w) and stride >= 1):
        raise ValueError(f'occlusion window {window} / stride {stride} do not fit a {h}x{w} input')
    # captum's positions: ceil((size - window) / stride) + 1 per dim; a last window may overhang (clipped)
    ys = [i * stride for i in range(math.ceil((h - window) / stride) + 1)]
    xs = [i * stride for i in range(math.ceil((w - window) / stride) + 1)]
    positions = [(y, x) for y in ys for x in xs]
    targets = targets.to(inputs.device)
    t = targets.shape[1]
    with torch.no_grad():
        base = model(inputs).gather(1, targets)  # (N, T)
        attr = inputs.new_zeros((n, t, h, w))
        count = inputs.new_zeros((h, w))
        per_pass = max(1, batch_size // n)
        for s in range(0, len(positions), per_pass):
            chunk = positions[s:s + per_pass]
            x = inputs.unsqueeze(0).repeat(len(chunk), 1, 1, 1, 1)
            for j, (y0, x0) in enumerate(chunk):
                x[j, :, :, y0:y0 + window, x0:x0 + window] = 0
            out = model(x.reshape(-1, c, h, w)).reshape(len(chunk), n, -1)
            drop = base[None] - out.gather(2, targets[None].expand(len(chunk), n, t))  # (P, N, T)
            for j, (y0, x0) in enumerate(chunk):
                attr[:, :, y0:y0 + window, x0:x0 + window] += drop[j][..., None, None]
                count[y0:y0 + window, x0:x0 + window] += 1
    return attr / count.clamp(min=1) * c


# --- the methods: (model, inputs, targets, settings) -> Attribution ----------------------------

def _per_row(inputs: Tensor, targets: Tensor, settings: AttributionSettings,
             attribute_rows: Callable[[Tensor, Tensor], Tensor]) -> Attribution:
    """Maps of a captum method that explains one target per input row: each image repeated for its
    T targets, the N * T rows in batches of ``settings.batch_size``, summed over the input channels."""
    n, t = targets.shape
    rows = inputs[:, None].expand(n, t, *inputs.shape[1:]).reshape(n * t, *inputs.shape[1:])
    flat_targets = targets.reshape(-1)
    parts = []
    for s in range(0, n * t, settings.batch_size):
        xb = rows[s:s + settings.batch_size].detach().clone().requires_grad_(True)
        parts.append(attribute_rows(xb, flat_targets[s:s + settings.batch_size]).detach().sum(1).float().cpu())
    return Attribution(torch.cat(parts).reshape(n, t, *inputs.shape[-2:]))


def _bcos(model: nn.Module, inputs: Tensor, targets: Tensor, settings: AttributionSettings) -> Attribution:
    """The model-inherent contributions ``sum_c W(x) * x`` (Eq. 15) and their Eq. 13 error."""
    if not is_bcos(model):
        raise ValueError("'bcos' (the model-inherent contributions, Eq. 15) needs a B-cos model")
    e = explain(model, inputs, target=targets)
    return Attribution(e.contributions.float().cpu(), eq13_error=e.check())


def _grad(model: nn.Module, inputs: Tensor, targets: Tensor, settings: AttributionSettings) -> Attribution:
    saliency = _captum().Saliency(model)
    return _per_row(inputs, targets, settings, lambda x, t: saliency.attribute(x, target=t, abs=False))


def _ixg(model: nn.Module, inputs: Tensor, targets: Tensor, settings: AttributionSettings) -> Attribution:
    ixg = _captum().InputXGradient(model)
    return _per_row(inputs, targets, settings, lambda x, t: ixg.attribute(x, target=t))


def _ig(model: nn.Module, inputs: Tensor, targets: Tensor, settings: AttributionSettings) -> Attribution:
    ig = _captum().IntegratedGradients(model)
    return _per_row(inputs, targets, settings, lambda x, t: ig.attribute(
        x, baselines=0.0, target=t, n_steps=settings.ig_steps, internal_batch_size=settings.batch_size))


def _deeplift(model: nn.Module, inputs: Tensor, targets: Tensor, settings: AttributionSettings) -> Attribution:
    deeplift = _captum().DeepLift(model)

    def rows(x: Tensor, t: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*[Ss]etting forward, backward hooks.*')
            return deeplift.attribute(x, baselines=0.0, target=t)

    return _per_row(inputs, targets, settings, rows)


def _gradcam(model: nn.Module, inputs: Tensor, targets: Tensor, settings: AttributionSettings) -> Attribution:
    captum = _captum()
    cam = captum.LayerGradCam(model, gradcam_layer(model, settings.gradcam_layer)[1])
    size = tuple(inputs.shape[-2:])
    return _per_row(inputs, targets, settings, lambda x, t: captum.LayerAttribution.interpolate(
        cam.attribute(x, target=t, relu_attributions=True), size, interpolate_mode='nearest'))


def _occlusion(model: nn.Module, inputs: Tensor, targets: Tensor, settings: AttributionSettings) -> Attribution:
    window, stride = settings.occlusion_geometry(min(inputs.shape[-2:]) // (settings.grid or 1))
    return Attribution(occlusion(model, inputs, targets, window, stride, settings.batch_size).float().cpu())


#: Every method by name, in the order of the tables and plots.
ATTRIBUTIONS: Dict[str, AttributionMethod] = {
    'bcos': AttributionMethod('B-cos (Eq. 15)', _bcos, post_hoc=False),
    'grad': AttributionMethod('Grad', _grad),
    'ixg': AttributionMethod('IxG', _ixg),
    'ig': AttributionMethod('IntGrad', _ig),
    'deeplift': AttributionMethod('DeepLIFT', _deeplift),
    'gradcam': AttributionMethod('GradCAM', _gradcam),
    'occlusion': AttributionMethod('Occlusion', _occlusion, perturbation=True),
}
#: All methods, in the order of the tables and plots.
METHODS = tuple(ATTRIBUTIONS)
POST_HOC = tuple(m for m, a in ATTRIBUTIONS.items() if a.post_hoc)
#: Perturbation-based methods: not smoothed by default (paper §4).
PERTURBATION = tuple(m for m, a in ATTRIBUTIONS.items() if a.perturbation)
METHOD_LABELS = {m: a.label for m, a in ATTRIBUTIONS.items()}


def default_methods(model: nn.Module) -> Tuple[str, ...]:
    """All methods for B-cos models, the post-hoc ones otherwise."""
    return METHODS if is_bcos(model) else POST_HOC


def run_method(model: nn.Module, method: str, images: Tensor, targets: Tensor,
               settings: AttributionSettings = AttributionSettings(),
               posthoc: Optional[nn.Module] = None) -> Attribution:
    """`method`'s `Attribution` of each image and target, looked up in `ATTRIBUTIONS`.

    `images`: (N, 3, H, W) in [0, 1], encoded here for the model; `targets`: (N, T). Post-hoc
    methods run on `posthoc` (a `posthoc_copy` of `model`; made here if not given), ``bcos`` on
    `model`.
    """
    if method not in ATTRIBUTIONS:
        raise ValueError(f'unknown method {method!r}; choose from {METHODS}')
    targets = torch.as_tensor(targets).long()
    if targets.dim() != 2:
        raise ValueError(f'targets must be (N, T), got shape {tuple(targets.shape)}')
    if len(images) != len(targets):
        raise ValueError(f'{len(images)} images but {len(targets)} rows of targets')
    entry = ATTRIBUTIONS[method]
    net = model
    if entry.post_hoc:
        net = posthoc if posthoc is not None else posthoc_copy(model)
    device = model_device(model)
    return entry(net, encode_input(model, images.to(device)), targets.to(device), settings)


def attribute(model: nn.Module, method: str, images: Tensor, targets: Tensor, *, grid: Optional[int] = None,
              batch_size: int = 64, ig_steps: int = 20, occlusion_window: Optional[int] = None,
              occlusion_stride: Optional[int] = None, gradcam_layer: Optional[str] = None) -> Tensor:
    """Attribution maps of `method` for each image and target class: (N, T, H, W) float32 on the CPU.

    Args:
        model: the classifier (B-cos: 6-channel input, the encoding is done here).
        method: one of `METHODS` (``bcos`` for B-cos models only).
        images: (N, 3, H, W) images in [0, 1].
        targets: (N, T) classes to explain per image.
        grid, batch_size, ig_steps, occlusion_window, occlusion_stride, gradcam_layer: the
            `AttributionSettings`.
    """
    settings = AttributionSettings(grid, batch_size, ig_steps, occlusion_window, occlusion_stride, gradcam_layer)
    return run_method(model, method, images, targets, settings).maps
