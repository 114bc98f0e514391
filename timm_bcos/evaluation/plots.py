"""The evaluation's figures: box plots of the pointing game (Fig. 5/6) and of the B ablation (Fig. 5),
example maps (Fig. 3/7). Figures come from `new_figure` (no pyplot state); callers save them."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from ..explain import explain
from ..explain.visualisation import new_figure
from .attribution import METHOD_LABELS, METHODS
from .inputs import model_device
from .pointing_game import PointingGame

__all__ = ['plot_ablation', 'plot_bcos_tiles', 'plot_boxes', 'plot_examples']


def plot_boxes(results: Dict[str, Dict[str, np.ndarray]], grid: int, title: str = ''):
    """Box plots like Fig. 5/6: per method, one box per model (``results[model][method]`` scores)."""
    fig = new_figure(figsize=(1.3 + 1.25 * len(METHODS), 4.2))
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


def _class_name(class_names: Optional[Sequence[str]], cls: int) -> str:
    return class_names[cls] if class_names is not None and cls < len(class_names) else str(cls)


def _no_ticks(axes: np.ndarray) -> None:
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])


def plot_examples(model: nn.Module, game: PointingGame, class_names: Optional[Sequence[str]], title: str = ''):
    """Like Fig. 3/7: per kept grid, the image and every method's map for one tile's class (outlined)."""
    methods = [m for m in game.scores if m in game.maps]
    k = min(len(v) for v in game.maps.values()) if game.maps else 0
    grid = game.grids.grid
    fig = new_figure(figsize=(1.9 * (1 + len(methods)), 2.1 * max(k, 1)))
    axes = np.asarray(fig.subplots(max(k, 1), 1 + len(methods), squeeze=False))
    rgba = None
    if 'bcos' in methods and k:
        g = game.grids.subset(slice(0, k))
        rgba = explain(model, g.images.to(model_device(model)), target=g.labels.to(model_device(model)))
    for i in range(k):
        tile = i % (grid * grid)
        name = _class_name(class_names, int(game.grids.labels[i, tile]))
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
    _no_ticks(axes)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_bcos_tiles(model: nn.Module, game: PointingGame, class_names: Optional[Sequence[str]], n: int = 3):
    """Like Fig. 3: grid images and the B-cos explanation (`Explanation.to_rgba`) of every tile's class."""
    g = game.grids.subset(slice(0, n))
    t = g.grid ** 2
    e = explain(model, g.images.to(model_device(model)), target=g.labels.to(model_device(model)))
    scores = game.scores.get('bcos')
    fig = new_figure(figsize=(1.6 * (1 + t), 1.8 * len(g)))
    axes = np.asarray(fig.subplots(len(g), 1 + t, squeeze=False))
    for i in range(len(g)):
        axes[i, 0].imshow(g.images[i].permute(1, 2, 0).numpy())
        axes[i, 0].set_title('input', fontsize=8)
        for tile in range(t):
            ax = axes[i, tile + 1]
            ax.set_facecolor('black')
            ax.imshow(e.to_rgba(i, tile))
            _outline(ax, g.grid, tile, g.images.shape[-2:])
            score = f': {scores[i, tile]:.2f}' if scores is not None else ''
            ax.set_title(f'{_class_name(class_names, int(g.labels[i, tile]))}{score}', fontsize=7)
    _no_ticks(axes)
    return fig


def plot_ablation(entries: List[Dict[str, Any]], arrays: Dict[str, np.ndarray], grid: int, data: str = ''):
    """Fig. 5: localisation box plots (left axis) and accuracy crosses (right axis) per run, ordered as Tab. 1."""
    fig = new_figure(figsize=(1.2 + 0.9 * len(entries), 4.0))
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
