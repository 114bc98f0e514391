"""The grid pointing game (paper §4 "Evaluating explanations", Fig. 5 and 6): every method's maps
of every tile's class on a model's grids, scored with `localisation`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .attribution import (METHODS, PERTURBATION, POST_HOC, AttributionSettings, default_methods, posthoc_copy,
                          run_method)
from .attribution import gradcam_layer as find_gradcam_layer
from .grids import Grids, make_grids
from .inputs import is_bcos
from .localisation import default_smoothing, localise, summarise

__all__ = ['PointingGame', 'pointing_game']


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


def _check_request(model: nn.Module, methods: Sequence[str], limits: Optional[Dict[str, int]]) -> Dict[str, int]:
    """Validate the methods and limits; returns the limits as a dict."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f'unknown method {m!r}; choose from {METHODS}')
    if 'bcos' in methods and not is_bcos(model):
        raise ValueError("'bcos' (the model-inherent contributions, Eq. 15) needs a B-cos model")
    limits = dict(limits or {})
    for m, v in limits.items():
        if m not in METHODS or int(v) < 1:
            raise ValueError(f'limits: {m}={v} (want a method of {METHODS} and a positive grid count)')
    return limits


def _worse(current: Optional[float], error: Optional[float]) -> Optional[float]:
    """The larger Eq. 13 error (a NaN, i.e. an unresolvable error, replaces the current one)."""
    if error is None:
        return current
    return error if current is None or not error <= current else current


@dataclass
class _Tally:
    """What the pointing game collects per method, chunk by chunk."""

    scores: Dict[str, List[np.ndarray]]
    totals: Dict[str, List[np.ndarray]]
    kept: Dict[str, List[Tensor]]
    seconds: Dict[str, float]
    eq13_error: Optional[float] = None

    @classmethod
    def empty(cls, methods: Sequence[str]) -> '_Tally':
        return cls({m: [] for m in methods}, {m: [] for m in methods}, {m: [] for m in methods},
                   {m: 0.0 for m in methods})


def _play(model: nn.Module, grids: Grids, methods: Sequence[str], smoothing: Dict[str, int],
          settings: AttributionSettings, count: Dict[str, int], keep_maps: int, progress: bool, label: str) -> _Tally:
    """Attribute and score chunks of ``batch_size // grid**2`` grids (model in eval mode)."""
    from tqdm.auto import tqdm

    grid = grids.grid
    per_chunk = max(1, settings.batch_size // (grid * grid))
    posthoc = posthoc_copy(model) if set(methods) & set(POST_HOC) else None
    tally = _Tally.empty(methods)
    bar = tqdm(total=len(grids), desc=label or 'pointing game', unit='grid', disable=not progress,
               dynamic_ncols=True, leave=False)
    for s in range(0, len(grids), per_chunk):
        stop = min(s + per_chunk, len(grids))
        g = grids.subset(slice(s, stop))
        for m in (m for m in methods if s < count[m]):
            t0 = time.perf_counter()
            result = run_method(model, m, g.images, g.labels, settings, posthoc)
            tally.seconds[m] += time.perf_counter() - t0
            tally.eq13_error = _worse(tally.eq13_error, result.eq13_error)
            a, labels = result.maps[:count[m] - s], g.labels[:count[m] - s]
            sc, total = localise(a, labels, grid, smoothing[m])
            tally.scores[m].append(sc.cpu().numpy())
            tally.totals[m].append(total.cpu().numpy())
            have = sum(len(x) for x in tally.kept[m])
            if have < keep_maps:
                tally.kept[m].append(a[:keep_maps - have])
        bar.update(stop - s)
    bar.close()
    return tally


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
    methods = tuple(default_methods(model) if methods is None else methods)
    limits = _check_request(model, methods, limits)
    if grids is None:
        if dataset is None:
            raise ValueError('pass a dataset (or grids)')
        grids = make_grids(dataset, model, grid, n_grids, seed, min_confidence=min_confidence,
                           batch_size=max(batch_size, 256), progress=progress)
    tile = min(grids.tile_size)
    k = default_smoothing(tile) if smooth is None else int(smooth)
    smoothing = {m: 1 if m in PERTURBATION else k for m in methods}
    count = {m: min(len(grids), int(limits.get(m, len(grids)))) for m in methods}
    settings = AttributionSettings(grids.grid, batch_size, ig_steps, occlusion_window, occlusion_stride, gradcam_layer)
    training = model.training
    model.eval()
    try:
        tally = _play(model, grids, methods, smoothing, settings, count, keep_maps, progress, label)
    finally:
        model.train(training)
    window, stride = settings.occlusion_geometry(tile)
    info = dict(grid=grids.grid, n_grids=len(grids), seed=seed, min_confidence=min_confidence, ig_steps=ig_steps,
                occlusion_window=window, occlusion_stride=stride, batch_size=batch_size, limits=limits,
                gradcam_layer=find_gradcam_layer(model, gradcam_layer)[0] if 'gradcam' in methods else None)
    return PointingGame({m: np.concatenate(v) for m, v in tally.scores.items()}, grids, smoothing, tally.seconds,
                        {m: int((np.concatenate(v) <= 0).sum()) for m, v in tally.totals.items()},
                        {m: torch.cat(v) for m, v in tally.kept.items() if v}, tally.eq13_error, info)
