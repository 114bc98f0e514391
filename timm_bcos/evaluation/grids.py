"""The grid images of the pointing game (paper §4 "Evaluating explanations").

From the test images that a model classifies correctly, sorted by its confidence per class,
`make_grids` builds ``grid x grid`` images of distinct classes (a seeded random choice of classes
per grid; each class contributes its next most confident image; as v1's ``LocalisationAnalyser``).
Each model gets its own grids (its own most confident images).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .inputs import encode_input, is_bcos, model_device, stack_items

__all__ = ['Grids', 'Ranking', 'make_grids', 'rank_by_confidence']


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


def _confidence(model: nn.Module, logits: Tensor) -> Tensor:
    """Class probabilities under the model's own loss: sigmoid (B-cos, BCE) or softmax (CE)."""
    return torch.sigmoid(logits) if is_bcos(model) else logits.softmax(1)


@torch.no_grad()
def _predict(model: nn.Module, dataset, batch_size: int, progress: bool) -> Tuple[np.ndarray, ...]:
    """Labels, predictions and true-class probabilities of every dataset item (model in eval mode)."""
    from tqdm.auto import tqdm

    training = model.training
    model.eval()
    device = model_device(model)
    ys, ps, cs = [], [], []
    try:
        for s in tqdm(range(0, len(dataset), batch_size), desc='ranking test images', unit='batch',
                      disable=not progress, leave=False):
            x, y = stack_items(dataset, range(s, min(s + batch_size, len(dataset))))
            p = _confidence(model, model(encode_input(model, x.to(device))).float()).cpu()
            ys.append(y)
            ps.append(p.argmax(1))
            cs.append(p.gather(1, y[:, None])[:, 0])
    finally:
        model.train(training)
    return torch.cat(ys).numpy(), torch.cat(ps).numpy(), torch.cat(cs).double().numpy()


def rank_by_confidence(model: Optional[nn.Module], dataset, batch_size: int = 256, progress: bool = False,
                       correct_only: bool = True) -> Ranking:
    """Run `model` over `dataset` (items ``(image (3, H, W) in [0, 1], label)``) and rank its correct images.

    Confidence: the probability of the true (= predicted) class, sigmoid of its logit for B-cos
    models (trained with BCE, Eq. 16), softmax otherwise. Ties keep the dataset order.
    ``correct_only=False`` keeps misclassified images too (ranked by their true class's
    probability; without a model: all images in dataset order) -- for smoke tests only.
    """
    if model is None:
        if correct_only:
            raise ValueError('ranking the correctly classified images needs the model')
        labels = np.array([int(dataset[i][1]) for i in range(len(dataset))])
        preds, confs = labels.copy(), np.zeros(len(labels))
    else:
        labels, preds, confs = _predict(model, dataset, batch_size, progress)
    correct = preds == labels
    keep = correct if correct_only else np.ones_like(correct)
    indices, confidences = {}, {}
    for c in np.unique(labels):
        idx = np.flatnonzero(keep & (labels == c))
        order = np.argsort(-confs[idx], kind='stable')
        indices[int(c)], confidences[int(c)] = idx[order], confs[idx][order]
    return Ranking(indices, confidences, float(correct.mean()) if len(labels) else float('nan'), len(labels))


def _choose_tiles(pools: Dict[int, np.ndarray], tiles: int, n_grids: int, seed: int) -> List[List[Tuple[int, int]]]:
    """Per grid, ``(class, dataset index)`` of each tile: `tiles` distinct classes drawn at random among
    those with images left, each giving its next image; stops when fewer classes have images left."""
    rng = np.random.default_rng(seed)
    used = {c: 0 for c in pools}
    chosen: List[List[Tuple[int, int]]] = []
    while len(chosen) < n_grids:
        available = np.array(sorted(c for c in pools if used[c] < len(pools[c])))
        if len(available) < tiles:
            break
        classes = rng.choice(available, size=tiles, replace=False)
        row = []
        for c in classes.tolist():
            row.append((c, int(pools[c][used[c]])))
            used[c] += 1
        chosen.append(row)
    return chosen


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
    chosen = _choose_tiles(pools, t, n_grids, seed)
    if len(chosen) < n_grids:
        warnings.warn(f'only {len(chosen)} of {n_grids} {grid}x{grid} grids could be built from '
                      f'{sum(len(p) for p in pools.values())} eligible images', stacklevel=2)
    labels = torch.tensor([[c for c, _ in row] for row in chosen], dtype=torch.long)
    indices = torch.tensor([[i for _, i in row] for row in chosen], dtype=torch.long)
    confidences = torch.tensor([[confs[c][i] for c, i in row] for row in chosen], dtype=torch.float64)
    tiles, tile_labels = stack_items(dataset, indices.flatten().tolist())
    if not torch.equal(tile_labels, labels.flatten()):
        raise RuntimeError('dataset labels changed between ranking and grid building')
    n, (c, h, w) = len(chosen), tiles.shape[1:]
    images = tiles.reshape(n, grid, grid, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, grid * h, grid * w)
    return Grids(images.contiguous(), labels, indices, confidences, grid)
