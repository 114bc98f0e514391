"""The grid pointing game (paper §4 "Evaluating explanations", Fig. 5 and 6) and the B ablation (§5.1).

    timm-bcos evaluate --model bcos_simple_cifar_tiny.fashion_mnist --baseline local-dir:runs/base \\
        --data fashion-mnist --grid 3 --n 500 --out conversion/results/pointing_3x3
    timm-bcos evaluate --ablation --data fashion-mnist --epochs 3 --n 250 \\
        --runs-dir runs/ablation --out conversion/results/ablation

Grids: from the test images that a model classifies correctly, sorted by its confidence per class,
`make_grids` builds ``grid x grid`` images of distinct classes (a seeded random choice of classes
per grid; each class contributes its next most confident image; as v1's ``LocalisationAnalyser``).
Each model gets its own grids (its own most confident images). For every tile, the attribution map
of that tile's class logit is smoothed (k x k mean, k = 3 for 32 px tiles, 15 for 224 px; not for
the perturbation method, as in the paper), its positive part kept, and the score is the fraction
of the positive mass that lies inside the tile (`localisation`; 0 when a map has no positive mass).
A uniform map scores 1 / grid**2, a perfect one 1.

Methods (`METHODS`): ``bcos``, the model-inherent contributions ``sum_c W(x) * x`` (Eq. 15, via
`timm_bcos.explain`; B-cos models only), and post-hoc methods through captum: ``grad`` (the plain
input gradient, signed: Saliency with ``abs=False``, as v1's "Grad"), ``ixg`` (InputXGradient),
``ig`` (IntegratedGradients, zero baseline), ``deeplift`` (DeepLift, zero baseline), ``gradcam``
(LayerGradCam on the model's feature extractor ``model.features``, i.e. the last convolution block
before the classifier, ReLU'd and upsampled to the input with nearest neighbours) and ``occlusion``
(captum's Occlusion semantics, computed for all of a grid's classes with one forward pass per
window position: see `occlusion`). Post-hoc methods see the model's own input: the 6-channel
encoding [x, 1-x] for B-cos models (perturbation baseline 0 in that encoding: a removed patch
contributes nothing to a B-cos network), RGB in [0, 1] for conventional ones; every map is summed
over the input channels to (H, W).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import add_inverse

__all__ = ['ABLATION_BS', 'METHODS', 'METHOD_LABELS', 'PERTURBATION', 'POST_HOC', 'Grids', 'PointingGame', 'Ranking',
           'ablation_model_kwargs', 'attribute',
           'b_ablation', 'default_smoothing', 'is_bcos', 'localisation', 'main', 'make_grids', 'occlusion',
           'plot_ablation', 'plot_bcos_tiles', 'plot_boxes', 'plot_examples', 'pointing_game', 'rank_by_confidence',
           'run_evaluation', 'summarise']

#: All methods, in the order of the tables and plots.
METHODS = ('bcos', 'grad', 'ixg', 'ig', 'deeplift', 'gradcam', 'occlusion')
POST_HOC = METHODS[1:]
#: Perturbation-based methods: not smoothed by default (paper §4).
PERTURBATION = ('occlusion',)
METHOD_LABELS = {'bcos': 'B-cos (Eq. 15)', 'grad': 'Grad', 'ixg': 'IxG', 'ig': 'IntGrad', 'deeplift': 'DeepLIFT',
                 'gradcam': 'GradCAM', 'occlusion': 'Occlusion'}

#: The B values of the ablation (paper Tab. 1 / Fig. 5), all with MaxOut 2; plus plain B=2.
ABLATION_BS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5)
#: v1's per-B logit temperature exponent T (temperature 10**T), experiments/CIFAR10/bcos/experiment_parameters.py.
V1_LOGIT_T = {1.0: -3, 1.25: -3, 1.5: -2, 1.75: 1, 2.0: 2, 2.25: 2, 2.5: 3}


def is_bcos(model: nn.Module) -> bool:
    """A B-cos network (it has a ``bcos_cfg``): its inputs are 6-channel [x, 1-x] encodings."""
    return getattr(model, 'bcos_cfg', None) is not None


def default_smoothing(tile_size: int) -> int:
    """The paper's smoothing kernel for a tile size: 3 for 32 px (CIFAR-10), 15 for 224 px (ImageNet).

    ``2 * round(tile / 32) + 1`` (halves rounded up), i.e. k ~ tile / 16: 1 up to 15 px, 3 for 16-47 px.
    """
    if tile_size < 1:
        raise ValueError(f'tile size must be positive, got {tile_size}')
    return 2 * int(math.floor(tile_size / 32 + 0.5)) + 1


# --- grids -------------------------------------------------------------------------------------

@dataclass
class Ranking:
    """Per class, the correctly classified test images sorted by the model's confidence (descending).

    ``indices[c]`` / ``confidences[c]``: dataset indices and confidences of class c's correctly
    classified images; ``accuracy``: the model's accuracy on the whole dataset.
    """

    indices: Dict[int, np.ndarray]
    confidences: Dict[int, np.ndarray]
    accuracy: float
    num_images: int


@dataclass
class Grids:
    """Grid images and what is where. Tiles are numbered row-major: tile t is at row t // grid, column t % grid.

    images: (N, 3, grid * H, grid * W) in [0, 1]; labels: (N, grid**2) class of each tile;
    indices: (N, grid**2) dataset index of each tile's image; confidences: (N, grid**2).
    """

    images: Tensor
    labels: Tensor
    indices: Tensor
    confidences: Tensor
    grid: int

    def __len__(self) -> int:
        return len(self.images)

    @property
    def tile_size(self) -> Tuple[int, int]:
        return self.images.shape[-2] // self.grid, self.images.shape[-1] // self.grid

    def subset(self, sl) -> 'Grids':
        return Grids(self.images[sl], self.labels[sl], self.indices[sl], self.confidences[sl], self.grid)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device('cpu')


def _encode(model: nn.Module, x: Tensor) -> Tensor:
    """The model's input: [x, 1-x] for B-cos models (6 input channels), x otherwise."""
    return add_inverse(x) if is_bcos(model) else x


def _confidence(model: nn.Module, logits: Tensor) -> Tensor:
    """Class probabilities under the model's own loss: sigmoid (B-cos, BCE) or softmax (CE)."""
    return torch.sigmoid(logits) if is_bcos(model) else logits.softmax(1)


def _stack(dataset, idx: Sequence[int]) -> Tuple[Tensor, Tensor]:
    items = [dataset[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


@torch.no_grad()
def rank_by_confidence(model: Optional[nn.Module], dataset, batch_size: int = 256, progress: bool = False,
                       correct_only: bool = True) -> Ranking:
    """Run `model` over `dataset` (items ``(image (3, H, W) in [0, 1], label)``) and rank its correct images.

    Confidence: the probability of the true (= predicted) class, sigmoid of its logit for B-cos
    models (trained with BCE, Eq. 16), softmax otherwise. Ties keep the dataset order.
    ``correct_only=False`` keeps misclassified images too (ranked by their true class's
    probability; without a model: all images in dataset order) -- for smoke tests only.
    """
    from tqdm.auto import tqdm

    if model is None:
        if correct_only:
            raise ValueError('ranking the correctly classified images needs the model')
        labels = np.array([int(dataset[i][1]) for i in range(len(dataset))])
        preds, confs = labels.copy(), np.zeros(len(labels))
    else:
        training = model.training
        model.eval()
        device = _device_of(model)
        ys, ps, cs = [], [], []
        try:
            for s in tqdm(range(0, len(dataset), batch_size), desc='ranking test images', unit='batch',
                          disable=not progress, leave=False):
                x, y = _stack(dataset, range(s, min(s + batch_size, len(dataset))))
                p = _confidence(model, model(_encode(model, x.to(device))).float()).cpu()
                ys.append(y)
                ps.append(p.argmax(1))
                cs.append(p.gather(1, y[:, None])[:, 0])
        finally:
            model.train(training)
        labels, preds, confs = torch.cat(ys).numpy(), torch.cat(ps).numpy(), torch.cat(cs).double().numpy()
    correct = preds == labels
    keep = correct if correct_only else np.ones_like(correct)
    indices, confidences = {}, {}
    for c in np.unique(labels):
        idx = np.flatnonzero(keep & (labels == c))
        order = np.argsort(-confs[idx], kind='stable')
        indices[int(c)], confidences[int(c)] = idx[order], confs[idx][order]
    return Ranking(indices, confidences, float(correct.mean()) if len(labels) else float('nan'), len(labels))


def make_grids(dataset, model: Optional[nn.Module] = None, grid: int = 3, n_grids: int = 500, seed: int = 0, *,
               min_confidence: float = 0.0, ranking: Optional[Ranking] = None, batch_size: int = 256,
               correct_only: bool = True, progress: bool = False) -> Grids:
    """``n_grids`` grid images of ``grid x grid`` tiles of distinct classes, from the most confident images.

    As v1's pointing game: rank each class's correctly classified images by confidence
    (`rank_by_confidence`); then, per grid, draw ``grid**2`` distinct classes at random (numpy
    generator seeded by `seed`) among the classes that still have images left, and take each
    class's next most confident image; tiles are placed in the drawn order. Stops early (with a
    warning) when fewer than ``grid**2`` classes have images left; every image is used at most once.

    Args:
        dataset: items ``(image (3, H, W) in [0, 1], label)``, all of the same size.
        model: ranks the images (or pass `ranking`).
        min_confidence: only images the model gives at least this probability (v1: 0.5).
        correct_only: False: misclassified images too, see `rank_by_confidence` (smoke tests with
            untrained models; `model` may then be None).
    """
    if grid < 1:
        raise ValueError(f'grid must be >= 1, got {grid}')
    if n_grids < 1:
        raise ValueError(f'n_grids must be >= 1, got {n_grids}')
    t = grid * grid
    if ranking is None:
        if model is None and correct_only:
            raise ValueError('make_grids needs the model (or a ranking) to find its correctly classified images')
        ranking = rank_by_confidence(model, dataset, batch_size, progress, correct_only)
    pools = {c: idx[ranking.confidences[c] >= min_confidence] for c, idx in ranking.indices.items()}
    pools = {c: idx for c, idx in pools.items() if len(idx)}
    confs = {c: dict(zip(ranking.indices[c].tolist(), ranking.confidences[c].tolist())) for c in pools}
    if len(pools) < t:
        raise ValueError(f'a {grid}x{grid} grid needs {t} classes with eligible (correctly classified, confidence >= '
                         f'{min_confidence}) images; there are such images for {len(pools)} classes only')
    rng = np.random.default_rng(seed)
    used = {c: 0 for c in pools}
    chosen: List[List[Tuple[int, int]]] = []
    while len(chosen) < n_grids:
        available = np.array(sorted(c for c in pools if used[c] < len(pools[c])))
        if len(available) < t:
            break
        classes = rng.choice(available, size=t, replace=False)
        row = []
        for c in classes.tolist():
            row.append((c, int(pools[c][used[c]])))
            used[c] += 1
        chosen.append(row)
    if len(chosen) < n_grids:
        warnings.warn(f'only {len(chosen)} of {n_grids} {grid}x{grid} grids could be built from '
                      f'{sum(len(p) for p in pools.values())} eligible images', stacklevel=2)
    labels = torch.tensor([[c for c, _ in row] for row in chosen], dtype=torch.long)
    indices = torch.tensor([[i for _, i in row] for row in chosen], dtype=torch.long)
    confidences = torch.tensor([[confs[c][i] for c, i in row] for row in chosen], dtype=torch.float64)
    tiles, tile_labels = _stack(dataset, indices.flatten().tolist())
    if not torch.equal(tile_labels, labels.flatten()):
        raise RuntimeError('dataset labels changed between ranking and grid building')
    n, (c, h, w) = len(chosen), tiles.shape[1:]
    images = tiles.reshape(n, grid, grid, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, grid * h, grid * w)
    return Grids(images.contiguous(), labels, indices, confidences, grid)


# --- the metric --------------------------------------------------------------------------------

def _localise(attributions: Tensor, labels: Tensor, grid: int, smooth: int,
              targets: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Scores (N, T) and the total positive mass (N, T) (0: the map had no positive part)."""
    if attributions.dim() != 4:
        raise ValueError(f'attributions must be (N, T, H, W), got shape {tuple(attributions.shape)}')
    n, t, h, w = attributions.shape
    labels = torch.as_tensor(labels).to(attributions.device).long()
    if labels.shape != (n, grid * grid):
        raise ValueError(f'labels must be (N, grid**2) = ({n}, {grid * grid}), got {tuple(labels.shape)}')
    targets = labels if targets is None else torch.as_tensor(targets).to(attributions.device).long()
    if targets.shape != (n, t):
        raise ValueError(f'targets must be (N, T) = ({n}, {t}), got {tuple(targets.shape)}')
    if h % grid or w % grid:
        raise ValueError(f'a {h}x{w} map does not split into {grid}x{grid} tiles')
    if not (isinstance(smooth, int) and smooth >= 1 and smooth % 2 == 1):
        raise ValueError(f'smooth must be an odd positive int, got {smooth!r}')
    match = labels[:, None, :] == targets[:, :, None]  # (N, T, grid**2)
    if not (match.sum(-1) == 1).all():
        raise ValueError('every target class must be the class of exactly one tile of its grid')
    a = attributions.detach().double()
    if smooth > 1:
        # v1: avg_pool2d(k, stride 1, padding k // 2), zero padding counted (count_include_pad)
        a = F.avg_pool2d(a.reshape(n * t, 1, h, w), smooth, stride=1, padding=smooth // 2).reshape(n, t, h, w)
    a = a.clamp(min=0)
    mass = a.reshape(n, t, grid, h // grid, grid, w // grid).sum((3, 5)).reshape(n, t, grid * grid)
    total = mass.sum(-1)
    inside = mass[match].reshape(n, t)
    return torch.where(total > 0, inside / torch.where(total > 0, total, 1), 0.0), total


def localisation(attributions: Tensor, labels: Tensor, grid: int, smooth: Optional[int] = None,
                 targets: Optional[Tensor] = None) -> np.ndarray:
    """The localisation score of each attribution map: positive mass in the correct tile / total positive mass.

    Args:
        attributions: (N, T, H, W) maps of N grid images, one per explained class.
        labels: (N, grid**2) class of each tile (row-major, as `Grids.labels`).
        grid: tiles per side.
        smooth: odd size of the k x k mean filter applied before taking the positive part (zero
            padding, as v1); None: `default_smoothing` of the tile size; 1: none.
        targets: (N, T) class explained by each map; default `labels` (map t explains tile t's class).

    Returns:
        (N, T) float64 scores in [0, 1]; a map without positive mass (after smoothing) scores 0
        (as v1: it points nowhere).
    """
    h = attributions.shape[-2]
    k = default_smoothing(h // grid) if smooth is None else smooth
    scores, _ = _localise(attributions, labels, grid, k, targets)
    return scores.cpu().numpy()


# --- attribution methods -----------------------------------------------------------------------

def _posthoc_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy for captum: frozen parameters, no in-place ReLUs (captum's hooks need that)."""
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    for mod in m.modules():
        if isinstance(mod, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid)) \
                and getattr(mod, 'inplace', False):
            mod.inplace = False
    return m


def _gradcam_layer(model: nn.Module, name: Optional[str]) -> Tuple[str, nn.Module]:
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


def attribute(model: nn.Module, method: str, images: Tensor, targets: Tensor, *, grid: Optional[int] = None,
              batch_size: int = 64, ig_steps: int = 20, occlusion_window: Optional[int] = None,
              occlusion_stride: Optional[int] = None, gradcam_layer: Optional[str] = None) -> Tensor:
    """Attribution maps of `method` for each image and target class: (N, T, H, W) float32 on the CPU.

    Args:
        model: the classifier (B-cos: 6-channel input, the encoding is done here).
        method: one of `METHODS` (``bcos`` for B-cos models only).
        images: (N, 3, H, W) images in [0, 1].
        targets: (N, T) classes to explain per image.
        grid: tiles per side (sets the default occlusion window: half a tile, stride a quarter tile).
        batch_size: images per forward/backward pass (post-hoc methods explain T copies of each image).
        ig_steps: IntegratedGradients' steps (Gauss-Legendre, captum's default rule).
        occlusion_window, occlusion_stride: in pixels; default tile // 2 and tile // 4.
        gradcam_layer: module name for GradCAM (default: ``model.features``).
    """
    return _attribute_many(model, (method,), images, targets, grid=grid, batch_size=batch_size, ig_steps=ig_steps,
                           occlusion_window=occlusion_window, occlusion_stride=occlusion_stride,
                           gradcam_layer=gradcam_layer)[0][method]


def _occlusion_geometry(tile: int, window: Optional[int], stride: Optional[int]) -> Tuple[int, int]:
    return window or max(1, tile // 2), stride or max(1, tile // 4)


def _attribute_many(model: nn.Module, methods: Sequence[str], images: Tensor, targets: Tensor, *,
                    grid: Optional[int] = None, batch_size: int = 64, ig_steps: int = 20,
                    occlusion_window: Optional[int] = None, occlusion_stride: Optional[int] = None,
                    gradcam_layer: Optional[str] = None, posthoc: Optional[nn.Module] = None,
                    ) -> Tuple[Dict[str, Tensor], Dict[str, float], Optional[float]]:
    """Maps of several methods for the same images: ({method: (N, T, H, W)}, {method: seconds}, Eq. 13 error).

    ``grad`` and ``ixg`` share one gradient (captum's Saliency without abs, per channel; IxG is
    input * that gradient, exactly captum's InputXGradient); its time is booked to ``grad``.
    """
    for method in methods:
        if method not in METHODS:
            raise ValueError(f'unknown method {method!r}; choose from {METHODS}')
    device = _device_of(model)
    targets = torch.as_tensor(targets).long()
    if targets.dim() != 2:
        raise ValueError(f'targets must be (N, T), got shape {tuple(targets.shape)}')
    n, t = targets.shape
    if len(images) != n:
        raise ValueError(f'{len(images)} images but {n} rows of targets')
    maps: Dict[str, Tensor] = {}
    seconds: Dict[str, float] = {}
    eq13 = None
    if 'bcos' in methods:
        if not is_bcos(model):
            raise ValueError("'bcos' (the model-inherent contributions, Eq. 15) needs a B-cos model")
        from .explain import explain
        t0 = time.perf_counter()
        e = explain(model, images.to(device), target=targets.to(device))
        maps['bcos'] = e.contributions.float().cpu()
        seconds['bcos'] = time.perf_counter() - t0
        eq13 = e.check()
    rest = [m for m in methods if m != 'bcos']
    if not rest:
        return maps, seconds, eq13
    m = posthoc if posthoc is not None else _posthoc_copy(model)
    x = _encode(model, images.to(device))
    h, w = x.shape[-2:]
    if 'occlusion' in rest:
        t0 = time.perf_counter()
        window, stride = _occlusion_geometry(min(h, w) // (grid or 1), occlusion_window, occlusion_stride)
        maps['occlusion'] = occlusion(m, x, targets.to(device), window, stride, batch_size).float().cpu()
        seconds['occlusion'] = time.perf_counter() - t0
    try:
        from captum.attr import DeepLift, IntegratedGradients, LayerAttribution, LayerGradCam, Saliency
    except ImportError as e:
        raise ImportError('the post-hoc attribution methods use captum: pip install captum, or timm-bcos[eval] (or --methods bcos)') from e

    rows = x[:, None].expand(n, t, *x.shape[1:]).reshape(n * t, *x.shape[1:])
    flat_targets = targets.reshape(-1).to(device)
    parts: Dict[str, List[Tensor]] = {k: [] for k in rest if k != 'occlusion'}
    layer = _gradcam_layer(m, gradcam_layer)[1] if 'gradcam' in rest else None
    for s in range(0, n * t, batch_size):
        xb = rows[s:s + batch_size].detach().clone().requires_grad_(True)
        tb = flat_targets[s:s + batch_size]
        if 'grad' in parts or 'ixg' in parts:
            t0 = time.perf_counter()
            g = Saliency(m).attribute(xb, target=tb, abs=False).detach()
            if 'grad' in parts:
                parts['grad'].append(g.sum(1).float().cpu())
            seconds['grad'] = seconds.get('grad', 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            if 'ixg' in parts:
                parts['ixg'].append((xb.detach() * g).sum(1).float().cpu())
            seconds['ixg'] = seconds.get('ixg', 0.0) + time.perf_counter() - t0
        for method in ('ig', 'deeplift', 'gradcam'):
            if method not in parts:
                continue
            t0 = time.perf_counter()
            if method == 'ig':
                a = IntegratedGradients(m).attribute(xb, baselines=0.0, target=tb, n_steps=ig_steps,
                                                     internal_batch_size=batch_size)
            elif method == 'deeplift':
                with warnings.catch_warnings():
                    warnings.filterwarnings('ignore', message='.*[Ss]etting forward, backward hooks.*')
                    a = DeepLift(m).attribute(xb, baselines=0.0, target=tb)
            else:
                a = LayerGradCam(m, layer).attribute(xb, target=tb, relu_attributions=True)
                a = LayerAttribution.interpolate(a, (h, w), interpolate_mode='nearest')
            parts[method].append(a.detach().sum(1).float().cpu())
            seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - t0
    for method, chunks in parts.items():
        maps[method] = torch.cat(chunks).reshape(n, t, h, w)
    return maps, seconds, eq13


# --- the pointing game -------------------------------------------------------------------------

def summarise(scores: np.ndarray, no_positive: Optional[int] = None) -> Dict[str, float]:
    """Mean, median, quartiles, min, max and count of scores (all tiles of all grids)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not len(s):
        return dict(n=0)
    q25, median, q75 = np.percentile(s, [25, 50, 75])
    out = dict(mean=float(s.mean()), median=float(median), q25=float(q25), q75=float(q75), min=float(s.min()),
               max=float(s.max()), n=int(len(s)))
    if no_positive is not None:
        out['no_positive_mass'] = int(no_positive)
    return out


@dataclass
class PointingGame:
    """Results of `pointing_game`: ``scores[method]`` is (N grids, grid**2) (tile t's class map's score).

    Also: the grids, the smoothing per method, seconds per method, the number of maps without
    positive mass per method, the maps of the first `keep_maps` grids, and for ``bcos`` the
    largest relative Eq. 13 error seen (the explanations are exact when it is ~1e-6 or below).
    """

    scores: Dict[str, np.ndarray]
    grids: Grids
    smooth: Dict[str, int]
    seconds: Dict[str, float]
    no_positive: Dict[str, int]
    maps: Dict[str, Tensor] = field(default_factory=dict)
    eq13_error: Optional[float] = None
    settings: Dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, method: str) -> np.ndarray:
        return self.scores[method]

    def keys(self):
        return self.scores.keys()

    def summary(self) -> Dict[str, Dict[str, float]]:
        return {m: dict(**summarise(s, self.no_positive.get(m)), grids=len(s),
                        seconds_per_grid=self.seconds[m] / max(1, len(s)), smooth=self.smooth[m])
                for m, s in self.scores.items()}


def _default_methods(model: nn.Module) -> Tuple[str, ...]:
    return METHODS if is_bcos(model) else POST_HOC


def pointing_game(model: nn.Module, dataset=None, *, grid: int = 3, n_grids: int = 500,
                  methods: Optional[Sequence[str]] = None, smooth: Optional[int] = None, batch_size: int = 64,
                  seed: int = 0, grids: Optional[Grids] = None, ig_steps: int = 20,
                  occlusion_window: Optional[int] = None, occlusion_stride: Optional[int] = None,
                  gradcam_layer: Optional[str] = None, min_confidence: float = 0.0,
                  limits: Optional[Dict[str, int]] = None, keep_maps: int = 0, progress: bool = True,
                  label: str = '') -> PointingGame:
    """The grid pointing game of `model` on grids from `dataset` (or the given `grids`).

    Args:
        model: a classifier; its device is used.
        dataset: test set, items ``(image (3, H, W) in [0, 1], label)``; grids by `make_grids`.
        grid, n_grids, seed, min_confidence: see `make_grids`.
        methods: default: all of `METHODS` for B-cos models, the post-hoc ones otherwise.
        smooth: kernel size for the non-perturbation methods; None: `default_smoothing` of the
            tile size. The perturbation method (occlusion) is never smoothed (paper §4).
        batch_size, ig_steps, occlusion_window, occlusion_stride, gradcam_layer: see `attribute`.
            Grids are processed in chunks of ``batch_size // grid**2`` (at least 1).
        limits: ``{method: n}``: evaluate that method on the first n grids only (expensive methods).
        keep_maps: keep the maps of this many first grids (``result.maps[method]``, (k, T, H, W)).
        progress: a tqdm bar over the grids.

    Returns:
        `PointingGame`; ``result[method]`` is the (N, grid**2) array of scores.
    """
    from tqdm.auto import tqdm

    methods = tuple(_default_methods(model) if methods is None else methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f'unknown method {m!r}; choose from {METHODS}')
    if 'bcos' in methods and not is_bcos(model):
        raise ValueError("'bcos' (the model-inherent contributions, Eq. 15) needs a B-cos model")
    limits = dict(limits or {})
    for m, v in limits.items():
        if m not in METHODS or int(v) < 1:
            raise ValueError(f'limits: {m}={v} (want a method of {METHODS} and a positive grid count)')
    if grids is None:
        if dataset is None:
            raise ValueError('pass a dataset (or grids)')
        grids = make_grids(dataset, model, grid, n_grids, seed, min_confidence=min_confidence,
                           batch_size=max(batch_size, 256), progress=progress)
    grid = grids.grid
    tile = min(grids.tile_size)
    k = default_smoothing(tile) if smooth is None else int(smooth)
    smoothing = {m: 1 if m in PERTURBATION else k for m in methods}
    count = {m: min(len(grids), int(limits.get(m, len(grids)))) for m in methods}
    t = grid * grid
    per_chunk = max(1, batch_size // t)
    training = model.training
    model.eval()
    posthoc = _posthoc_copy(model) if set(methods) & set(POST_HOC) else None
    scores = {m: [] for m in methods}
    totals = {m: [] for m in methods}
    kept = {m: [] for m in methods}
    seconds = {m: 0.0 for m in methods}
    eq13 = None
    try:
        bar = tqdm(total=len(grids), desc=label or 'pointing game', unit='grid', disable=not progress,
                   dynamic_ncols=True, leave=False)
        for s in range(0, len(grids), per_chunk):
            active = [m for m in methods if s < count[m]]
            stop = min(s + per_chunk, len(grids))
            g = grids.subset(slice(s, stop))
            maps, secs, err = _attribute_many(model, active, g.images, g.labels, grid=grid, batch_size=batch_size,
                                              ig_steps=ig_steps, occlusion_window=occlusion_window,
                                              occlusion_stride=occlusion_stride, gradcam_layer=gradcam_layer,
                                              posthoc=posthoc)
            if err is not None:
                eq13 = err if eq13 is None or not err <= eq13 else eq13
            for m in active:
                a, labels = maps[m][:count[m] - s], g.labels[:count[m] - s]
                sc, total = _localise(a, labels, grid, smoothing[m])
                scores[m].append(sc.cpu().numpy())
                totals[m].append(total.cpu().numpy())
                seconds[m] += secs.get(m, 0.0)
                have = sum(len(x) for x in kept[m])
                if have < keep_maps:
                    kept[m].append(a[:keep_maps - have])
            bar.update(stop - s)
        bar.close()
    finally:
        model.train(training)
    window, stride = _occlusion_geometry(tile, occlusion_window, occlusion_stride)
    settings = dict(grid=grid, n_grids=len(grids), seed=seed, min_confidence=min_confidence, ig_steps=ig_steps,
                    occlusion_window=window, occlusion_stride=stride, batch_size=batch_size, limits=limits,
                    gradcam_layer=_gradcam_layer(model, gradcam_layer)[0] if 'gradcam' in methods else None)
    return PointingGame({m: np.concatenate(v) for m, v in scores.items()}, grids, smoothing, seconds,
                        {m: int((np.concatenate(v) <= 0).sum()) for m, v in totals.items()},
                        {m: torch.cat(v) for m, v in kept.items() if v}, eq13, settings)


# --- evaluation run: tables, plots, examples -----------------------------------------------------

def _load(model: Union[str, nn.Module], device: torch.device) -> Tuple[nn.Module, str]:
    if isinstance(model, nn.Module):
        return model.to(device).eval(), type(model).__name__
    from .models import load_model
    return load_model(model).to(device).eval(), model


def _input_size(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('input_size')
    return int(size[-1]) if size else None


def _write_atomic(path: Path, data: Union[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + path.name + '.', dir=path.parent)
    with os.fdopen(fd, 'wb') as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    _write_atomic(path, buf.getvalue())


def _figure(**kwargs):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError('the plots need matplotlib: pip install matplotlib, or timm-bcos[eval]') from e
    fig = Figure(layout='constrained', **kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_boxes(results: Dict[str, Dict[str, np.ndarray]], grid: int, title: str = ''):
    """Box plots like Fig. 5/6: per method, one box per model (``results[model][method]`` scores)."""
    fig = _figure(figsize=(1.3 + 1.25 * len(METHODS), 4.2))
    ax = fig.subplots()
    models = list(results)
    colours = ['tab:orange', 'tab:gray', 'tab:blue', 'tab:green']
    methods = [m for m in METHODS if any(m in r for r in results.values())]
    width = 0.8 / max(1, len(models))
    handles = []
    for i, name in enumerate(models):
        pos = [j + (i - (len(models) - 1) / 2) * width for j, m in enumerate(methods) if m in results[name]]
        data = [np.asarray(results[name][m]).ravel() for m in methods if m in results[name]]
        if not data:
            continue
        bp = ax.boxplot(data, positions=pos, widths=width * 0.85, patch_artist=True, showfliers=False,
                        medianprops=dict(color='black'))
        for box in bp['boxes']:
            box.set_facecolor(colours[i % len(colours)])
            box.set_alpha(0.8)
        ax.scatter(pos, [d.mean() for d in data], marker='x', color='black', zorder=3, s=20)
        handles.append((bp['boxes'][0], name))
    ax.axhline(1 / grid ** 2, color='tab:red', ls='--', lw=1)
    ax.text(len(methods) - 0.5, 1 / grid ** 2, f' uniform 1/{grid * grid}', color='tab:red', va='bottom',
            ha='right', fontsize=8)
    ax.set_xticks(range(len(methods)), [METHOD_LABELS[m] for m in methods], rotation=20)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f'localisation ({grid}x{grid} grids)')
    ax.set_title(title or f'grid pointing game, {grid}x{grid}', fontsize=10)
    ax.legend([h for h, _ in handles], [n for _, n in handles], loc='upper center', bbox_to_anchor=(0.5, -0.2),
              ncol=len(handles), fontsize=8, frameon=False)  # below the axes: never over a box
    ax.grid(axis='y', alpha=0.3)
    return fig


def _show_map(ax, a: np.ndarray) -> None:
    v = float(np.percentile(np.abs(a), 99.5)) or float(np.abs(a).max()) or 1.0
    ax.imshow(a, cmap='bwr', vmin=-v, vmax=v)


def _outline(ax, grid: int, tile: int, size: Tuple[int, int]) -> None:
    from matplotlib.patches import Rectangle
    th, tw = size[0] // grid, size[1] // grid
    r, c = divmod(tile, grid)
    ax.add_patch(Rectangle((c * tw - 0.5, r * th - 0.5), tw, th, fill=False, ec='lime', lw=1.5))


def plot_examples(model: nn.Module, game: PointingGame, class_names: Optional[Sequence[str]], title: str = ''):
    """Like Fig. 3/7: per kept grid, the image and every method's map for one tile's class (outlined)."""
    methods = [m for m in game.scores if m in game.maps]
    k = min(len(v) for v in game.maps.values()) if game.maps else 0
    grid = game.grids.grid
    fig = _figure(figsize=(1.9 * (1 + len(methods)), 2.1 * max(k, 1)))
    axes = np.asarray(fig.subplots(max(k, 1), 1 + len(methods), squeeze=False))
    rgba = None
    if 'bcos' in methods and k:
        from .explain import explain
        g = game.grids.subset(slice(0, k))
        rgba = explain(model, g.images.to(_device_of(model)), target=g.labels.to(_device_of(model)))
    for i in range(k):
        tile = i % (grid * grid)
        cls = int(game.grids.labels[i, tile])
        name = class_names[cls] if class_names is not None and cls < len(class_names) else str(cls)
        img = game.grids.images[i].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(img)
        _outline(axes[i, 0], grid, tile, img.shape[:2])
        axes[i, 0].set_title(f'grid {i}: {name}', fontsize=8)
        for j, m in enumerate(methods, 1):
            ax = axes[i, j]
            if m == 'bcos':
                ax.set_facecolor('black')
                ax.imshow(rgba.to_rgba(i, tile))
            else:
                _show_map(ax, game.maps[m][i, tile].numpy())
            _outline(ax, grid, tile, img.shape[:2])
            ax.set_title(f'{METHOD_LABELS[m]}: {game.scores[m][i, tile]:.2f}', fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_bcos_tiles(model: nn.Module, game: PointingGame, class_names: Optional[Sequence[str]], n: int = 3):
    """Like Fig. 3: grid images and the B-cos explanation (`Explanation.to_rgba`) of every tile's class."""
    from .explain import explain
    g = game.grids.subset(slice(0, n))
    t = g.grid ** 2
    e = explain(model, g.images.to(_device_of(model)), target=g.labels.to(_device_of(model)))
    scores = game.scores.get('bcos')
    fig = _figure(figsize=(1.6 * (1 + t), 1.8 * len(g)))
    axes = np.asarray(fig.subplots(len(g), 1 + t, squeeze=False))
    for i in range(len(g)):
        axes[i, 0].imshow(g.images[i].permute(1, 2, 0).numpy())
        axes[i, 0].set_title('input', fontsize=8)
        for tile in range(t):
            ax = axes[i, tile + 1]
            ax.set_facecolor('black')
            ax.imshow(e.to_rgba(i, tile))
            _outline(ax, g.grid, tile, g.images.shape[-2:])
            cls = int(g.labels[i, tile])
            name = class_names[cls] if class_names is not None and cls < len(class_names) else str(cls)
            score = f': {scores[i, tile]:.2f}' if scores is not None else ''
            ax.set_title(f'{name}{score}', fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def _markdown(results: Dict[str, Any]) -> str:
    s = results['settings']
    lines = [f'# Grid pointing game: {s["grid"]}x{s["grid"]} grids on {s["data"]}', '',
             f'{s["data_description"]}. Grids: the most confidently and correctly classified test images of each '
             f'model (seed {s["seed"]}); score: positive attribution in the correct tile / all positive attribution '
             f'(a uniform map scores {1 / s["grid"] ** 2:.3f}). Smoothing: {s["smooth"]} (non-perturbation methods), '
             f'none for occlusion (window {s["occlusion_window"]} px, stride {s["occlusion_stride"]} px); '
             f'IntegratedGradients: {s["ig_steps"]} steps (zero baseline); GradCAM on each model\'s '
             f'`{next((r["gradcam_layer"] for r in results["models"].values() if r.get("gradcam_layer")), "-")}` '
             f'(ReLU, nearest upsampling).', '',
             '| model | test acc. | method | grids | mean | median | q25 | q75 | no positive mass | s / grid |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for key, r in results['models'].items():
        for m, st in r['methods'].items():
            lines.append(f'| {key} (`{r["name"]}`) | {100 * r["accuracy"]:.2f}% | {METHOD_LABELS[m]} | '
                         f'{st["grids"]} | {st["mean"]:.3f} | {st["median"]:.3f} | {st["q25"]:.3f} | '
                         f'{st["q75"]:.3f} | {st.get("no_positive_mass", 0)} / {st["n"]} | '
                         f'{st["seconds_per_grid"]:.3f} |')
    err = {k: r.get('bcos_eq13_max_error') for k, r in results['models'].items() if r.get('bcos_eq13_max_error')}
    if err:
        lines += ['', 'B-cos contributions: largest relative Eq. 13 error ' +
                  ', '.join(f'{k}: {v:.1e}' for k, v in err.items()) + '.']
    lines += ['', 'Times: seconds per grid on this run\'s hardware (IxG reuses Grad\'s gradient: its time is in '
              'Grad\'s). Post-hoc methods see the model\'s input (the 6-channel [x, 1-x] encoding for B-cos '
              'models) and are summed over its channels.', '', '![box plots](boxplot.png)', '']
    return '\n'.join(lines)


def run_evaluation(model: Union[str, nn.Module], baseline: Union[str, nn.Module, None] = None,
                   data: str = 'fashion-mnist', *, grid: int = 3, n_grids: int = 500,
                   methods: Optional[Sequence[str]] = None, smooth: Optional[int] = None,
                   out: Union[str, Path] = 'out/evaluate',
                   seed: int = 0, batch_size: int = 64, img_size: Optional[int] = None, ig_steps: int = 20,
                   occlusion_window: Optional[int] = None, occlusion_stride: Optional[int] = None,
                   min_confidence: float = 0.0, limits: Optional[Dict[str, int]] = None, n_examples: int = 4,
                   device: Union[str, torch.device, None] = None, progress: bool = True) -> Dict[str, Any]:
    """Pointing game of a B-cos model (and optionally a conventional baseline) on one data source.

    Writes to `out`: ``results.json`` (settings, per model and method: mean, median, quartiles,
    min, max, counts, seconds per grid), ``results.md`` (the table), ``scores.npz`` (every score,
    ``<model>/<method>`` arrays of shape (grids, grid**2)), ``boxplot.png`` (Fig. 5/6 style),
    ``examples_<model>.png`` (grid + every method's map for one tile class, Fig. 3/7 style) and
    ``examples_bcos_tiles.png`` (B-cos explanations of every tile's class, Fig. 3).

    `model`/`baseline`: timm names (after ``import timm_bcos``), ``local-dir:PATH``, ``hf-hub:ID`` or
    modules. `methods`: applied to each model where applicable (``bcos`` only to B-cos models).
    """
    import timm

    from .data import build_datasets

    dev = torch.device(device) if device is not None else torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    out = Path(out)
    loaded = [('bcos', *_load(model, dev))]
    if baseline is not None:
        loaded.append(('baseline', *_load(baseline, dev)))
    if not is_bcos(loaded[0][1]):
        warnings.warn(f'{loaded[0][2]} is not a B-cos model (no bcos_cfg): no model-inherent explanations',
                      stacklevel=2)
    sizes = {_input_size(m) for _, m, _ in loaded}
    size = img_size or next((s for s in sizes if s), None)
    if size is None:
        raise ValueError('cannot tell the input size of the models: pass img_size')
    splits = build_datasets(data, size, augment=False)
    results: Dict[str, Any] = dict(
        settings=dict(data=data, data_description=splits.description, img_size=size, grid=grid,
                      n_grids_requested=n_grids, seed=seed, min_confidence=min_confidence, ig_steps=ig_steps,
                      smooth=default_smoothing(size) if smooth is None else smooth, batch_size=batch_size,
                      limits=dict(limits or {}),
                      device=str(dev), torch=torch.__version__, timm=timm.__version__,
                      captum=_version('captum')),
        models={})
    boxes, arrays = {}, {}
    for key, m, name in loaded:
        ms = [x for x in (methods or _default_methods(m)) if x != 'bcos' or is_bcos(m)]
        t0 = time.perf_counter()
        ranking = rank_by_confidence(m, splits.test, batch_size=max(256, batch_size), progress=progress)
        grids = make_grids(splits.test, m, grid, n_grids, seed, min_confidence=min_confidence, ranking=ranking)
        game = pointing_game(m, grids=grids, methods=ms, smooth=smooth, batch_size=batch_size, seed=seed,
                             ig_steps=ig_steps, occlusion_window=occlusion_window, occlusion_stride=occlusion_stride,
                             min_confidence=min_confidence, limits=limits, keep_maps=n_examples, progress=progress,
                             label=key)
        results['settings'].update(occlusion_window=game.settings['occlusion_window'],
                                   occlusion_stride=game.settings['occlusion_stride'])
        entry = dict(name=name, architecture=(getattr(m, 'pretrained_cfg', None) or {}).get('architecture'),
                     bcos=is_bcos(m), accuracy=ranking.accuracy, test_images=ranking.num_images, n_grids=len(grids),
                     gradcam_layer=game.settings['gradcam_layer'], methods=game.summary(),
                     seconds=time.perf_counter() - t0)
        if game.eq13_error is not None:  # NaN (unresolvable, untrained nets) is stored as null
            entry['bcos_eq13_max_error'] = game.eq13_error if math.isfinite(game.eq13_error) else None
        results['models'][key] = entry
        label = f'{key} ({name})'
        boxes[label] = game.scores
        arrays.update({f'{key}/{meth}': s for meth, s in game.scores.items()})
        arrays[f'{key}/labels'] = grids.labels.numpy()
        arrays[f'{key}/indices'] = grids.indices.numpy()
        if n_examples:
            fig = plot_examples(m, game, splits.classes, title=f'{label}: maps for the outlined tile\'s class '
                                                               f'(title: localisation score)')
            _save_figure(fig, out / f'examples_{key}.png')
            if is_bcos(m) and 'bcos' in game.scores:
                _save_figure(plot_bcos_tiles(m, game, splits.classes, n=min(3, n_examples)),
                             out / 'examples_bcos_tiles.png')
        print(f'{label}: accuracy {100 * ranking.accuracy:.2f}%, {len(grids)} grids: ' + ', '.join(
            f'{meth} {st["mean"]:.3f} ({st["seconds_per_grid"]:.3f} s/grid)' for meth, st in entry['methods'].items()))
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / 'results.json', json.dumps(results, indent=2) + '\n')
    _write_atomic(out / 'results.md', _markdown(results))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    _write_atomic(out / 'scores.npz', buf.getvalue())
    _save_figure(plot_boxes(boxes, grid, title=f'{data}: {grid}x{grid} grid pointing game'), out / 'boxplot.png')
    return results


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        return None


# --- the B ablation ----------------------------------------------------------------------------

def ablation_model_kwargs(b: float, max_out: int = 2) -> Dict[str, Any]:
    """v1's CIFAR-10 settings for B: layer scale ``10**(-2 + 1.5 * (2.5 - B))`` (a fixed output divisor,
    `BcosSimpleNet`'s ``scale``) and logit temperature ``10**T`` (`V1_LOGIT_T`, B=1..2.5)."""
    b = float(b)
    if b not in V1_LOGIT_T:
        raise ValueError(f'no v1 logit temperature for B={b}; known: {sorted(V1_LOGIT_T)}')
    return dict(b=b, max_out=max_out, scale=10 ** (-2 + 1.5 * (2.5 - b)), logit_temperature=10.0 ** V1_LOGIT_T[b])


def _run_name(b: float, max_out: int) -> str:
    return f'B{b:.2f}-' + ('plain' if max_out == 1 else f'M{max_out}')


def b_ablation(out: Union[str, Path] = 'conversion/results/ablation', data: str = 'fashion-mnist', *,
               bs: Sequence[float] = ABLATION_BS, plain: bool = True, runs_dir: Union[str, Path, None] = None,
               model: str = 'bcos_simple_cifar_tiny', img_size: Optional[int] = None, epochs: int = 3,
               batch_size: int = 128, lr: float = 1e-3, lr_base_batch: Optional[int] = None,
               schedule: str = 'cosine', warmup_epochs: float = 0.0, train_subset: Optional[int] = None,
               max_steps: Optional[int] = None, seed: int = 0, grid: int = 3, n_grids: int = 250,
               eval_batch_size: int = 64, min_confidence: float = 0.0, model_kwargs: Optional[Dict[str, Any]] = None,
               calibrate_temperature: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Fig. 5: train the simple B-cos net for each B (MaxOut 2) and plain B=2, then accuracy and ``bcos`` localisation.

    Each run trains with `timm_bcos.train.train` (BCE, Adam; per-B scale and logit temperature from
    `ablation_model_kwargs`) into ``runs_dir/<B>-<M2|plain>/`` (default ``out/runs``): a finished
    run (results.json with ``finished``) is not trained again, an interrupted one resumes from its
    last epoch; a finished run with another config is an error (delete it or use another
    runs_dir). Its evaluation is cached in ``localisation_<g>x<g>.json`` next to it (recomputed
    when the evaluation settings change). Writes ``ablation.json``, ``ablation.md``,
    ``ablation.png`` (accuracy crosses and localisation box plots against B) and ``scores.npz`` to `out`.

    `calibrate_temperature`: instead of v1's per-B logit temperature (tuned for the 64-256 wide
    CIFAR-10 net), use the one that gives the initial network logits (minus the bias) a standard
    deviation of 1 on 256 training images (3 significant digits; the layer scales stay v1's).
    A model that classifies too few classes correctly for a grid gets no localisation scores
    (recorded, not an error).
    """
    import timm

    from .data import build_datasets
    from .training import TrainConfig, train

    out = Path(out)
    runs = Path(runs_dir) if runs_dir is not None else out / 'runs'
    configs = ([(2.0, 1)] if plain else []) + [(float(b), 2) for b in bs]
    entries, arrays, splits = [], {}, None
    for b, max_out in configs:
        name = _run_name(b, max_out)
        run = runs / name
        kwargs = dict(ablation_model_kwargs(b, max_out), **(model_kwargs or {}))
        if calibrate_temperature:
            kwargs['logit_temperature'] = _calibrated_temperature(model, kwargs, data, img_size, seed)
        cfg = TrainConfig(model=model, model_kwargs=kwargs, data=data, img_size=img_size, epochs=epochs,
                          batch_size=batch_size, lr=lr, lr_base_batch=lr_base_batch, schedule=schedule,
                          warmup_epochs=warmup_epochs, train_subset=train_subset, loss='bce', seed=seed,
                          output=str(run), resume=True, max_steps=max_steps, progress=progress)
        done = _finished_run(run, cfg)
        if done is None:
            print(f'ablation: training {name} -> {run}')
            train(cfg)
            done = _finished_run(run, cfg)
            if done is None and max_steps is None:
                raise RuntimeError(f'{run}: training did not finish')
        else:
            print(f'ablation: {name} already trained ({run})')
        train_results = json.loads((run / 'results.json').read_text())
        settings = dict(grid=grid, n_grids=n_grids, seed=seed, min_confidence=min_confidence,
                        weights=train_results['metrics'].get('weights_sha256'))
        cache, cache_npy = run / f'localisation_{grid}x{grid}.json', run / f'localisation_{grid}x{grid}.npy'
        cached = json.loads(cache.read_text()) if cache.exists() else None
        if cached is not None and cached.get('settings') == settings and cache_npy.exists():
            scores = np.load(cache_npy)
            acc, n_built, err = cached['accuracy'], cached['n_grids'], cached.get('eq13_error')
            print(f'ablation: {name} localisation cached')
        else:
            net = timm.create_model(f'local-dir:{run}', pretrained=True).eval()
            size = _input_size(net) or img_size
            if splits is None or splits[0] != size:
                splits = (size, build_datasets(data, size, augment=False))
            ranking = rank_by_confidence(net, splits[1].test, progress=progress)
            try:
                grids = make_grids(splits[1].test, net, grid, n_grids, seed, min_confidence=min_confidence,
                                   ranking=ranking)
            except ValueError as e:  # too few classes classified correctly: no grid
                warnings.warn(f'{name}: no localisation ({e})', stacklevel=2)
                grids = None
            if grids is None:
                scores, acc, n_built, err = np.zeros((0, grid * grid)), ranking.accuracy, 0, None
            else:
                game = pointing_game(net, grids=grids, methods=('bcos',), batch_size=eval_batch_size,
                                     progress=progress, label=name)
                scores, acc, n_built, err = game['bcos'], ranking.accuracy, len(grids), game.eq13_error
                err = err if err is not None and math.isfinite(err) else None
            buf = io.BytesIO()
            np.save(buf, scores)
            _write_atomic(cache_npy, buf.getvalue())
            _write_atomic(cache, json.dumps(dict(settings=settings, accuracy=acc, n_grids=n_built, eq13_error=err,
                                                 summary=summarise(scores)), indent=2) + '\n')
        arrays[name] = scores
        entries.append(dict(name=name, b=b, max_out=max_out, model_kwargs=kwargs, accuracy=acc,
                            train_test_acc=train_results['metrics'].get('test_acc'),
                            epochs=train_results['metrics'].get('epochs_completed'),
                            train_seconds=sum(r.get('seconds', 0) for r in train_results.get('history', [])),
                            n_grids=n_built, eq13_max_error=err, localisation=summarise(scores), run=str(run)))
        loc = f'{float(np.mean(scores)):.3f}' if np.size(scores) else 'n/a (no grid)'
        print(f'ablation: {name}: accuracy {100 * acc:.2f}%, localisation mean {loc}')
    result = dict(settings=dict(data=data, model=model, epochs=epochs, batch_size=batch_size, lr=lr,
                                lr_base_batch=lr_base_batch, schedule=schedule, warmup_epochs=warmup_epochs,
                                train_subset=train_subset, max_steps=max_steps, seed=seed, grid=grid,
                                n_grids=n_grids, min_confidence=min_confidence, model_kwargs=model_kwargs or {},
                                calibrate_temperature=calibrate_temperature),
                  runs=entries)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / 'ablation.json', json.dumps(result, indent=2) + '\n')
    _write_atomic(out / 'ablation.md', _ablation_markdown(result))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    _write_atomic(out / 'scores.npz', buf.getvalue())
    _save_figure(plot_ablation(entries, arrays, grid, data), out / 'ablation.png')
    return result


def _calibrated_temperature(model: str, kwargs: Dict[str, Any], data: str, img_size: Optional[int],
                            seed: int) -> float:
    """The logit temperature that gives the initial logits (minus the bias) unit std on 256 training images.

    The network is initialised as `timm_bcos.train.train` does (``set_seed(seed)``, then
    ``create_model``), so this is the network that training starts from.
    """
    import timm
    from accelerate.utils import set_seed

    from .data import build_datasets, count_classes

    set_seed(seed)
    net = timm.create_model(model, num_classes=count_classes(data), **dict(kwargs, logit_temperature=None)).eval()
    size = img_size or _input_size(net)
    train_set = build_datasets(data, size, augment=False).train
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:256]
    x, _ = _stack(train_set, pick.tolist())
    with torch.no_grad():
        out = net(_encode(net, x)).double()
    bias = getattr(getattr(net, 'logit', None), 'bias', None) or 0.0
    std = float((out - bias).std())
    if not (math.isfinite(std) and std > 0):
        raise RuntimeError(f'cannot calibrate the logit temperature of {model} {kwargs}: initial logit std {std}')
    return float(f'{std:.3g}')


def _finished_run(run: Path, cfg) -> Optional[Dict[str, Any]]:
    """The results of a finished run in `run` with the same config (else None; another config: error)."""
    path = run / 'results.json'
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    mine = {k: v for k, v in cfg.to_dict().items() if k not in ('output', 'resume', 'overwrite', 'progress', 'cpu',
                                                                'num_workers', 'max_steps')}
    theirs = {k: v for k, v in results.get('config', {}).items() if k in mine}
    if theirs != mine:
        diff = sorted(k for k in mine if theirs.get(k) != mine[k])
        raise RuntimeError(f'{run} holds a run with another config (differs in {diff}); delete it or use another '
                           f'runs_dir')
    if not results.get('metrics', {}).get('finished') and cfg.max_steps is None:
        return None
    return results


def _ablation_markdown(result: Dict[str, Any]) -> str:
    s = result['settings']
    lines = [f'# B ablation on {s["data"]} (paper Tab. 1 / Fig. 5)', '',
             f'`{s["model"]}` trained {s["epochs"]} epochs per run (batch {s["batch_size"]}, lr {s["lr"]}, '
             f'{s["schedule"]}, BCE, seed {s["seed"]}'
             + (f', {s["train_subset"]} training images' if s['train_subset'] else '') + '); per-B layer scale '
             '10^(-2 + 1.5 (2.5 - B)) and logit temperature '
             + ('calibrated to unit initial logit std' if s.get('calibrate_temperature') else
                '10^T (v1 CIFAR-10 settings)') + '. Localisation: '
             f'model-inherent contributions (Eq. 15) on {s["n_grids"]} {s["grid"]}x{s["grid"]} grids.', '',
             '| run | B | MaxOut | scale | temperature | test acc. | loc. mean | median | q25 | q75 | grids |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in result['runs']:
        loc, kw = r['localisation'], r['model_kwargs']
        lines.append(f'| {r["name"]} | {r["b"]:.2f} | {r["max_out"]} | {kw["scale"]:.3g} | '
                     f'{kw["logit_temperature"]:.3g} | {100 * r["accuracy"]:.2f}% | '
                     f'{loc.get("mean", float("nan")):.3f} | '
                     f'{loc.get("median", float("nan")):.3f} | {loc.get("q25", float("nan")):.3f} | '
                     f'{loc.get("q75", float("nan")):.3f} | {r["n_grids"]} |')
    lines += ['', '![ablation](ablation.png)', '']
    return '\n'.join(lines)


def plot_ablation(entries: List[Dict[str, Any]], arrays: Dict[str, np.ndarray], grid: int, data: str = ''):
    """Fig. 5: localisation box plots (left axis) and accuracy crosses (right axis) per run, ordered as Tab. 1."""
    fig = _figure(figsize=(1.2 + 0.9 * len(entries), 4.0))
    ax = fig.subplots()
    pos = list(range(len(entries)))
    have = [i for i, e in enumerate(entries) if np.asarray(arrays[e['name']]).size]
    bp = ax.boxplot([np.asarray(arrays[entries[i]['name']]).ravel() for i in have], positions=have, widths=0.6,
                    patch_artist=True, showfliers=False, medianprops=dict(color='black'))
    for box in bp['boxes']:
        box.set_facecolor('tab:orange')
        box.set_alpha(0.7)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f'localisation ({grid}x{grid}, Eq. 15)')
    ax.set_xticks(pos, [f'{e["b"]:.2f}' + ('\nplain' if e['max_out'] == 1 else '') for e in entries])
    ax.set_xlabel('B')
    ax.axhline(1 / grid ** 2, color='tab:red', ls='--', lw=1)
    ax2 = ax.twinx()
    ax2.plot(pos, [100 * e['accuracy'] for e in entries], 'x', color='tab:blue', ms=9, mew=2)
    ax2.set_ylabel('test accuracy (%)', color='tab:blue')
    ax.set_title(f'B ablation{" on " + data if data else ""}: accuracy (x) and localisation (boxes)', fontsize=10)
    ax.grid(axis='y', alpha=0.3)
    return fig


# --- command line ------------------------------------------------------------------------------

def build_parser(prog: str = 'timm-bcos evaluate') -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description='Grid pointing game of B-cos explanations vs post-hoc methods '
                                                       '(paper §4, Fig. 5/6), or the B ablation (--ablation).')
    p.add_argument('--model', default='bcos_simple_cifar_tiny.fashion_mnist',
                   help='the B-cos model: timm name, local-dir:PATH or hf-hub:ID')
    p.add_argument('--baseline', help='a conventional model to compare (e.g. local-dir:runs/baseline)')
    p.add_argument('--data', default='fashion-mnist', help="'digits', 'fashion-mnist' or an image folder")
    p.add_argument('--grid', type=int, default=3, choices=(2, 3), help='tiles per side')
    p.add_argument('--n', type=int, default=500, help='number of grids')
    p.add_argument('--methods', nargs='+', choices=METHODS, help=f'default: all ({" ".join(METHODS)})')
    p.add_argument('--smooth', type=int, help='smoothing kernel (odd) of the non-perturbation maps; default: '
                                              '2 * round(tile / 32) + 1 (3 at 32 px, 15 at 224 px)')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch-size', type=int, default=64, help='images per forward/backward pass')
    p.add_argument('--img-size', type=int, help="default: the model's input size")
    p.add_argument('--ig-steps', type=int, default=20, help='IntegratedGradients steps')
    p.add_argument('--occlusion-window', type=int, help='px; default half a tile')
    p.add_argument('--occlusion-stride', type=int, help='px; default a quarter tile')
    p.add_argument('--min-confidence', type=float, default=0.0, help='only images with this probability (v1: 0.5)')
    p.add_argument('--limit', action='append', default=[], metavar='METHOD=N',
                   help='evaluate METHOD on the first N grids only (repeatable), e.g. --limit ig=100')
    p.add_argument('--examples', type=int, default=4, help='example grids to plot')
    p.add_argument('--device', help='default: cuda if available')
    p.add_argument('--threads', type=int, help='torch CPU threads')
    p.add_argument('--no-progress', action='store_true')
    a = p.add_argument_group('B ablation (--ablation): train per B, then accuracy and B-cos localisation')
    a.add_argument('--ablation', action='store_true')
    a.add_argument('--bs', type=float, nargs='+', default=list(ABLATION_BS), help='B values (MaxOut 2)')
    a.add_argument('--no-plain', action='store_true', help='skip plain B=2 (MaxOut 1)')
    a.add_argument('--runs-dir', help='training runs (default: OUT/runs)')
    a.add_argument('--ablation-model', default='bcos_simple_cifar_tiny')
    a.add_argument('--epochs', type=int, default=3)
    a.add_argument('--train-batch-size', type=int, default=128)
    a.add_argument('--lr', type=float, default=1e-3)
    a.add_argument('--schedule', default='cosine', choices=('step', 'cosine', 'constant'))
    a.add_argument('--warmup-epochs', type=float, default=0.0)
    a.add_argument('--train-subset', type=int, help='train on a fixed random subset of this many images')
    a.add_argument('--max-steps', type=int, help='stop each training run after this many steps (smoke tests)')
    a.add_argument('--calibrate-temperature', action='store_true',
                   help="logit temperature for unit initial logit std instead of v1's per-B values")
    return p


def _parse_limits(items: Sequence[str], parser: argparse.ArgumentParser) -> Dict[str, int]:
    limits = {}
    for item in items:
        method, _, n = item.partition('=')
        if method not in METHODS or not n.isdigit() or int(n) < 1:
            parser.error(f'--limit wants METHOD=N with METHOD in {METHODS} and N >= 1, got {item!r}')
        limits[method] = int(n)
    return limits


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    limits = _parse_limits(args.limit, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # untrained / small B-cos nets make denormals: much slower on CPU otherwise
    if args.ablation:
        if args.baseline:
            raise SystemExit('timm-bcos evaluate: --baseline does not apply to --ablation')
        return b_ablation(args.out, args.data, bs=args.bs, plain=not args.no_plain, runs_dir=args.runs_dir,
                          model=args.ablation_model, img_size=args.img_size, epochs=args.epochs,
                          batch_size=args.train_batch_size, lr=args.lr, schedule=args.schedule,
                          warmup_epochs=args.warmup_epochs, train_subset=args.train_subset, max_steps=args.max_steps,
                          seed=args.seed, grid=args.grid, n_grids=args.n, eval_batch_size=args.batch_size,
                          min_confidence=args.min_confidence, calibrate_temperature=args.calibrate_temperature,
                          progress=not args.no_progress)
    results = run_evaluation(args.model, args.baseline, args.data, grid=args.grid, n_grids=args.n, methods=args.methods,
                             smooth=args.smooth, out=args.out, seed=args.seed, batch_size=args.batch_size,
                             img_size=args.img_size, ig_steps=args.ig_steps, occlusion_window=args.occlusion_window,
                             occlusion_stride=args.occlusion_stride, min_confidence=args.min_confidence,
                             limits=limits, n_examples=args.examples, device=args.device, progress=not args.no_progress)
    print(f'results: {args.out}/results.md')
    return results


if __name__ == '__main__':
    main()
