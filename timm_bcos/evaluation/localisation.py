"""The localisation metric of the grid pointing game (paper §4 "Evaluating explanations").

For every tile, the attribution map of that tile's class logit is smoothed (k x k mean, k = 3 for
32 px tiles, 15 for 224 px; not for the perturbation method, as in the paper), its positive part
kept, and the score is the fraction of the positive mass that lies inside the tile
(`localisation`; 0 when a map has no positive mass). A uniform map scores 1 / grid**2, a perfect one 1.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['default_smoothing', 'localisation', 'localise', 'summarise']


def default_smoothing(tile_size: int) -> int:
    """The paper's smoothing kernel for a tile size: 3 for 32 px (CIFAR-10), 15 for 224 px (ImageNet).

    ``2 * round(tile / 32) + 1`` (halves rounded up), i.e. k ~ tile / 16: 1 up to 15 px, 3 for 16-47 px.
    """
    if tile_size < 1:
        raise ValueError(f'tile size must be positive, got {tile_size}')
    return 2 * int(math.floor(tile_size / 32 + 0.5)) + 1


def localise(attributions: Tensor, labels: Tensor, grid: int, smooth: int,
             targets: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """`localisation` with an explicit kernel, on the maps' device: scores (N, T) float64 and the total
    positive mass (N, T) of each map (0: it had no positive part; the pointing game counts those)."""
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
    scores, _ = localise(attributions, labels, grid, k, targets)
    return scores.cpu().numpy()


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
