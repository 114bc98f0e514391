"""`Explanation`: the exact explanations of a batch (paper Eq. 13-15) and what can be done with them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from torch import Tensor

from .._utils import save_figure
from .linearity import eq13_error
from .visualisation import explanation_rgba, new_figure

__all__ = ['Explanation']


@dataclass(eq=False)
class Explanation:
    """Exact explanations of a batch: ``logits = contributions.sum((-2, -1)) + bias`` (Eq. 13, 15),
    plus the contributions of the explained constants (a ViT's positional embedding and class
    token) where the model has them.

    Attributes:
        weights: rows of the dynamic linear map W(x), (N, T, C, H, W) with C the input channels.
        contributions: ``sum_c W(x) * x``, the spatial contribution maps of Eq. 15, (N, T, H, W).
        logits: the explained outputs (class logits, or activations of `layer`), (N, T).
        targets: the explained class (or channel) per image and column, (N, T).
        bias: the output at x = 0 (and explained constants 0), ``b`` of Eq. 13, (N, T).
        inputs: the encoded inputs, (N, C, H, W).
        prediction: the predicted class per image, (N,); None for a `layer` explanation.
        probabilities: ``sigmoid(logits)`` (B-cos models train with BCE), (N, T); None for a layer.
        layer: the explained module's name, None for the model's outputs.
        positions: the explained spatial position per image and column, (N, T, S) for S spatial
            dims of the layer's output; None for logits and (N, C) activations.
        class_names: the model's label names (``pretrained_cfg['label_names']``) if it has them.
        constants: the contribution ``W_c(x) c`` of each explained constant (a positional embedding,
            a class token: `timm_bcos.layers.ExplainedConstant`) by name, each (N, T); None if the
            model has none. Then ``logits = contributions.sum + sum(constants) + bias``.
        warning: why the explanation is not exact (parts of the model left unconverted, or Eq. 13
            violated), as `explain` warned; None for an exact explanation.
    """

    weights: Tensor
    contributions: Tensor
    logits: Tensor
    targets: Tensor
    bias: Tensor
    inputs: Tensor
    prediction: Optional[Tensor] = None
    probabilities: Optional[Tensor] = None
    layer: Optional[str] = None
    positions: Optional[Tensor] = None
    class_names: Optional[List[str]] = None
    constants: Optional[Dict[str, Tensor]] = None
    warning: Optional[str] = None

    @property
    def exact(self) -> bool:
        """True unless `explain` found the explanation inexact (see `warning`)."""
        return self.warning is None

    def check(self, index: Optional[int] = None) -> float:
        """The Eq. 13 error (`eq13_error`): ``|contributions.sum + bias - logits| / max |logits - bias|``
        (the explained constants' contributions included in the sum).

        Over the whole batch, or image `index` only. Normalised by ``|logits - bias|``, not
        ``|logits|``: untrained B-cos outputs are tiny next to a logit bias. Returns NaN with a
        warning when ``logits - bias`` is too small to resolve in the logits' dtype (never a
        vacuous 0), inf when any of them is NaN or inf.
        """
        rows = slice(None) if index is None else [self._check_index(index)]
        linear = self.contributions[rows].sum((-2, -1))
        for c in (self.constants or {}).values():
            linear = linear + c[rows]
        return eq13_error(linear, self.bias[rows], self.logits[rows], 'Explanation.check')

    def column(self, target: int, index: int = 0) -> int:
        """The column of class (or channel) `target` among image `index`'s explained targets."""
        self._check_index(index)
        hits = (self.targets[index] == int(target)).nonzero().flatten().tolist()
        if not hits:
            raise ValueError(f'{target} was not explained for image {index}; explained targets: '
                             f'{self.targets[index].tolist()}')
        return hits[0]

    def delta(self, c1: int, c2: int, index: int = 0) -> Tensor:
        """Δ-explanation (Fig. 9): contribution map of target column `c1` minus that of `c2`, (H, W).

        `c1`, `c2` are target *columns* (0 is the top class with ``k=...``), as in `to_rgba`; map
        class ids to columns with `column`. Positive values are evidence for `c1` over `c2`.
        """
        self._check_index(index)
        self._check_column(c1)
        self._check_column(c2)
        return self.contributions[index, c1] - self.contributions[index, c2]

    def to_rgba(self, index: int = 0, target: int = 0, smooth: int = 1, percentile: float = 99.5) -> np.ndarray:
        """The paper's colour visualisation of a row of W(x) (§4 "Visualisations details").

        Only pixels that contribute positively (``sum_c W * x > 0``) are visible. Colours: W is
        divided by its max |value| over channels, clamped to >= 0, and each channel pair is
        normalised to ``r = w_r / (w_r + w_{1-r})`` (keeps the pair's angle, lands in [0, 1]).
        Opacity: ``min(||w_(x,y)||_2 / p, 1)`` with p the `percentile` of the weight norms over all
        positions, average-pooled over `smooth` x `smooth` visible pixels (odd `smooth`; 1 = none).

        Args:
            index: the image.
            target: the target column (0 = first explained target).
            smooth: odd kernel size of the opacity smoothing.
            percentile: the opacity cut-off percentile, in (0, 100].

        Returns:
            float32 array (H, W, 4) in [0, 1]; masked pixels have alpha exactly 0.
        """
        self._check_index(index)
        self._check_column(target)
        return explanation_rgba(self.weights[index, target], self.contributions[index, target], smooth, percentile)

    def plot(self, index: int = 0, ax=None, class_names: Optional[Sequence[str]] = None):
        """Draw image `index`: one row per target with the input, `to_rgba` and the contribution map.

        Args:
            index: the image.
            ax: optional (T, 3) array of matplotlib axes to draw into (3 * T axes in any shape);
                default: a new figure (not registered with pyplot, so no global state changes).
            class_names: titles for class ids; default: the model's label names, if any.

        Returns:
            the matplotlib Figure.
        """
        self._check_index(index)
        return self._draw([index], ax, class_names)

    def save(self, path: Union[str, os.PathLike], class_names: Optional[Sequence[str]] = None,
             index: Optional[int] = None) -> None:
        """Write the `plot` of image `index` (default: all images, stacked) to a PNG, atomically
        (readers never see a partial file)."""
        indices = range(len(self.inputs)) if index is None else [index]
        for i in indices:
            self._check_index(i)
        save_figure(self._draw(list(indices), None, class_names), path)

    def plot_overview(self, titles: Optional[Sequence[str]] = None, wrong: Optional[Sequence[bool]] = None,
                      title: str = '', cols: int = 8):
        """All images in a grid, each above the colour explanation (`to_rgba`) of its first target,
        on black. `titles`: one per image (default: the first target's label); `wrong`: images
        whose title is drawn in red. Returns the matplotlib Figure."""
        n = len(self.inputs)
        titles = [self.label(i, 0, self.class_names) for i in range(n)] if titles is None else titles
        wrong = [False] * n if wrong is None else wrong
        rows = -(-n // cols)
        fig = new_figure(figsize=(1.6 * cols, 3.5 * rows))
        axes = fig.subplots(2 * rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.axis('off')
        for i in range(n):
            top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
            top.imshow(self.inputs[i, :3].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy())
            top.set_title(titles[i], fontsize=8, color='red' if wrong[i] else 'black')
            rgba = self.to_rgba(index=i)
            bottom.imshow(rgba[..., :3] * rgba[..., 3:])  # on black, as in the explanation PNGs
        if title:
            fig.suptitle(title, fontsize=9)
        return fig

    def label(self, i: int, j: int, names: Optional[Sequence[str]] = None) -> str:
        """Title of image `i`'s target column `j`: the class name (or layer unit) and its probability (value)."""
        c = int(self.targets[i, j])
        if self.layer is not None:
            where = '' if self.positions is None else f' @ {tuple(self.positions[i, j].tolist())}'
            return f'{self.layer}[{c}]{where}: {self.logits[i, j].item():.3g}'
        name = names[c] if names is not None and c < len(names) else f'class {c}'
        return f'{name}: p={self.probabilities[i, j].item():.3f}'

    def _draw(self, indices: List[int], ax, class_names: Optional[Sequence[str]]):
        """One row per (image, target): the input, `to_rgba` and the contribution map (Eq. 15)."""
        names = list(class_names) if class_names is not None else self.class_names
        t = self.targets.shape[1]
        rows = len(indices) * t
        if ax is None:
            fig = new_figure(figsize=(7.5, 2.6 * rows))
            axes = np.asarray(fig.subplots(rows, 3, squeeze=False))
        else:
            axes = np.asarray(ax, dtype=object)
            if axes.size != rows * 3:
                raise ValueError(f'ax must hold {rows * 3} axes ({rows} targets x 3 panels), got {axes.size}')
            axes = axes.reshape(rows, 3)
            fig = axes[0, 0].figure
        for r, (i, j) in enumerate((i, j) for i in indices for j in range(t)):
            image = self.inputs[i, :3].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
            contrib = self.contributions[i, j].float().cpu().numpy()
            vmax = float(np.abs(contrib).max()) or 1.0
            a_img, a_rgba, a_map = axes[r]
            a_img.imshow(image)
            a_img.set_title(f'image {i}', fontsize=9)
            a_rgba.set_facecolor('black')
            a_rgba.imshow(self.to_rgba(i, j))
            a_rgba.set_title(self.label(i, j, names), fontsize=9)
            im = a_map.imshow(contrib, cmap='bwr', vmin=-vmax, vmax=vmax)
            a_map.set_title('contributions (Eq. 15)', fontsize=9)
            fig.colorbar(im, ax=a_map, fraction=0.046, pad=0.04)
            for a in axes[r]:
                a.set_xticks([])
                a.set_yticks([])
        return fig

    def _check_index(self, index: int) -> int:
        if not -len(self.inputs) <= index < len(self.inputs):
            raise IndexError(f'image index {index} out of range for {len(self.inputs)} images')
        return index

    def _check_column(self, column: int) -> None:
        t = self.targets.shape[1]
        if not -t <= column < t:
            raise IndexError(f'target column {column} out of range: {t} targets were explained '
                             f'(use Explanation.column(class_id) to look up a class)')
