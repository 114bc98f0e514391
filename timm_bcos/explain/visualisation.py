"""Pictures of explanations: the paper's colour visualisation (§4) and matplotlib figures.

matplotlib is optional (``timm-bcos[eval]``): it is imported only when a figure is drawn.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .explanation import Explanation

__all__ = ['draw_explanations', 'explanation_rgba', 'new_figure', 'overview_figure']


def explanation_rgba(weights: Tensor, contributions: Tensor, smooth: int = 1, percentile: float = 99.5) -> np.ndarray:
    """The colour visualisation of one row of W(x), (6, H, W), with its contribution map (H, W).

    See `Explanation.to_rgba`: visible where the contribution is positive; colour
    ``w_r / (w_r + w_{1-r})`` of the non-negative, max-normalised weights; opacity the weight norm
    over its `percentile`, optionally averaged over `smooth` x `smooth` visible pixels.
    """
    if not (isinstance(smooth, int) and smooth >= 1 and smooth % 2 == 1):
        raise ValueError(f'smooth must be an odd positive int, got {smooth!r}')
    if not 0 < percentile <= 100:
        raise ValueError(f'percentile must be in (0, 100], got {percentile!r}')
    w = weights.double()
    if w.shape[0] != 6:
        raise ValueError(f'the colour visualisation needs the 6-channel encoding [x, 1-x] (§4), '
                         f'got {w.shape[0]} input channels')
    visible = (contributions > 0).double()
    norm = torch.linalg.vector_norm(w, dim=0)
    cutoff = torch.quantile(norm.flatten(), percentile / 100)
    alpha = (norm / cutoff).clamp(max=1) if cutoff > 0 else torch.zeros_like(norm)
    alpha = alpha * visible
    if smooth > 1:
        # Mean over the visible pixels of each window, so hidden pixels do not darken the edges.
        pool = lambda t: F.avg_pool2d(t[None, None], smooth, 1, smooth // 2)[0, 0]  # noqa: E731
        alpha = pool(alpha) / pool(visible).clamp_min(1e-12) * visible
    rgb = (w / w.abs().amax(0).clamp_min(torch.finfo(w.dtype).tiny)).clamp(min=0)
    rgb = rgb[:3] / (rgb[:3] + rgb[3:]).clamp_min(1e-12)
    rgba = torch.cat([rgb, alpha[None]]).clamp(0, 1).permute(1, 2, 0)
    return rgba.float().cpu().numpy()


def new_figure(**kwargs):
    """A matplotlib Figure with constrained layout and an Agg canvas, not registered with pyplot
    (no global state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError('plotting needs matplotlib: pip install matplotlib, or timm-bcos[eval]') from e
    fig = Figure(layout='constrained', **kwargs)
    FigureCanvasAgg(fig)
    return fig


def draw_explanations(e: 'Explanation', indices: List[int], ax=None, class_names: Optional[Sequence[str]] = None):
    """One row per (image, target): the input, `Explanation.to_rgba` and the contribution map (Eq. 15).

    `ax`: optional axes to draw into (3 per row, any shape); default: a new figure.
    """
    names = list(class_names) if class_names is not None else e.class_names
    t = e.targets.shape[1]
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
        image = e.inputs[i, :3].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
        contrib = e.contributions[i, j].float().cpu().numpy()
        vmax = float(np.abs(contrib).max()) or 1.0
        a_img, a_rgba, a_map = axes[r]
        a_img.imshow(image)
        a_img.set_title(f'image {i}', fontsize=9)
        a_rgba.set_facecolor('black')
        a_rgba.imshow(e.to_rgba(i, j))
        a_rgba.set_title(e.label(i, j, names), fontsize=9)
        im = a_map.imshow(contrib, cmap='bwr', vmin=-vmax, vmax=vmax)
        a_map.set_title('contributions (Eq. 15)', fontsize=9)
        fig.colorbar(im, ax=a_map, fraction=0.046, pad=0.04)
        for a in axes[r]:
            a.set_xticks([])
            a.set_yticks([])
    return fig


def overview_figure(e: 'Explanation', titles: Sequence[str], wrong: Sequence[bool], suptitle: str, cols: int = 8):
    """Every image above the colour explanation of its first target (on black); red titles for `wrong`."""
    n = len(e.inputs)
    rows = -(-n // cols)
    fig = new_figure(figsize=(1.6 * cols, 3.5 * rows))
    axes = fig.subplots(2 * rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    for i in range(n):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        top.imshow(e.inputs[i, :3].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy())
        top.set_title(titles[i], fontsize=8, color='red' if wrong[i] else 'black')
        rgba = e.to_rgba(index=i)
        bottom.imshow(rgba[..., :3] * rgba[..., 3:])  # on black, as in the explanation PNGs
    fig.suptitle(suptitle, fontsize=9)
    return fig
