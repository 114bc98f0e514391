"""The paper's colour visualisation of explanations (§4), and figures to draw them on.

matplotlib is optional (``timm-bcos[eval]``): it is imported only when a figure is drawn.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['explanation_rgba', 'new_figure']


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
