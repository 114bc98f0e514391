"""An evaluation run (`run_evaluation`: models -> pointing games -> results.json / .md, scores.npz, plots)
and the markdown tables of the pointing game (paper §4, Fig. 5/6) and of the B ablation (§5.1, Tab. 1)."""
from __future__ import annotations

import io
import math
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
from torch import nn

from .._utils import OutputFolder, package_version, save_figure, write_atomic, write_json
from ..data import build_datasets
from ..models import load_model
from .attribution import METHOD_LABELS, default_methods
from .grids import make_grids, rank_by_confidence
from .inputs import input_size, is_bcos
from .localisation import default_smoothing
from .plots import plot_bcos_tiles, plot_boxes, plot_examples
from .pointing_game import PointingGame, pointing_game

__all__ = ['ablation_markdown', 'pointing_game_markdown', 'run_evaluation', 'write_npz']


def write_npz(path: Union[str, Path], arrays: Dict[str, np.ndarray]) -> None:
    """`write_atomic` of a compressed ``.npz`` of `arrays`."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_atomic(path, buf.getvalue())


def pointing_game_markdown(results: Dict[str, Any]) -> str:
    """``results.md``: the settings and one row per model and method of `run_evaluation`'s results."""
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
    err = {k: r.get('eq13_error') for k, r in results['models'].items() if r.get('eq13_error')}
    if err:
        lines += ['', 'B-cos contributions: largest relative Eq. 13 error ' +
                  ', '.join(f'{k}: {v:.1e}' for k, v in err.items()) + '.']
    lines += ['', 'Times: seconds per grid on this run\'s hardware. Post-hoc methods see the model\'s input (the '
              '6-channel [x, 1-x] encoding for B-cos models) and are summed over its channels.', '',
              '![box plots](boxplot.png)', '']
    return '\n'.join(lines)


def ablation_markdown(result: Dict[str, Any]) -> str:
    """``ablation.md``: the settings and one row per run of `b_ablation`'s result (Tab. 1 with localisation)."""
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


def _load(model: Union[str, nn.Module], device: torch.device) -> Tuple[nn.Module, str]:
    if isinstance(model, nn.Module):
        return model.to(device).eval(), type(model).__name__
    return load_model(model).to(device).eval(), model


def _play_model(key: str, model: nn.Module, name: str, test_set, grid: int, n_grids: int,
                methods: Optional[Sequence[str]], game_kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], PointingGame]:
    """One model's pointing game on its own grids, and its ``results.json`` entry."""
    ms = [x for x in (methods or default_methods(model)) if x != 'bcos' or is_bcos(model)]
    t0 = time.perf_counter()
    ranking = rank_by_confidence(model, test_set, batch_size=max(256, game_kwargs['batch_size']),
                                 progress=game_kwargs['progress'])
    grids = make_grids(test_set, model, grid, n_grids, game_kwargs['seed'],
                       min_confidence=game_kwargs['min_confidence'], ranking=ranking)
    game = pointing_game(model, grids=grids, methods=ms, label=key, **game_kwargs)
    entry = dict(name=name, architecture=(getattr(model, 'pretrained_cfg', None) or {}).get('architecture'),
                 bcos=is_bcos(model), accuracy=ranking.accuracy, test_images=ranking.num_images, n_grids=len(grids),
                 gradcam_layer=game.settings['gradcam_layer'], methods=game.summary(),
                 seconds=time.perf_counter() - t0)
    if game.eq13_error is not None:  # NaN (unresolvable, untrained nets) is stored as null
        entry['eq13_error'] = game.eq13_error if math.isfinite(game.eq13_error) else None
    return entry, game


def _save_examples(out: OutputFolder, key: str, label: str, model: nn.Module, game: PointingGame,
                   classes: Optional[Sequence[str]], n_examples: int) -> None:
    fig = plot_examples(model, game, classes, title=f'{label}: maps for the outlined tile\'s class '
                                                    f'(title: localisation score)')
    save_figure(fig, out.path(f'examples_{key}.png'), dpi=110)
    if is_bcos(model) and 'bcos' in game.scores:
        save_figure(plot_bcos_tiles(model, game, classes, n=min(3, n_examples)), out.path('examples_bcos_tiles.png'),
                    dpi=110)


def run_evaluation(model: Union[str, nn.Module], baseline: Union[str, nn.Module, None] = None,
                   data: str = 'fashion-mnist', *, grid: int = 3, n_grids: int = 500,
                   methods: Optional[Sequence[str]] = None, smooth: Optional[int] = None,
                   out: Union[str, Path] = 'out/evaluate',
                   seed: int = 0, batch_size: int = 64, img_size: Optional[int] = None, ig_steps: int = 20,
                   occlusion_window: Optional[int] = None, occlusion_stride: Optional[int] = None,
                   min_confidence: float = 0.0, limits: Optional[Dict[str, int]] = None, n_examples: int = 4,
                   device: Union[str, torch.device, None] = None, progress: bool = True) -> Dict[str, Any]:
    """Pointing game of a B-cos model (and optionally a conventional baseline) on one data source.

    Writes to `out` (new, empty or an earlier evaluate output: `OutputFolder`): ``results.json``
    (settings, per model and method: mean, median, quartiles, min, max, counts, seconds per grid;
    per B-cos model the largest relative Eq. 13 error, ``eq13_error``), ``results.md`` (the table),
    ``scores.npz`` (every score, ``<model>/<method>`` arrays of shape (grids, grid**2)),
    ``boxplot.png`` (Fig. 5/6 style),
    ``examples_<model>.png`` (grid + every method's map for one tile class, Fig. 3/7 style) and
    ``examples_bcos_tiles.png`` (B-cos explanations of every tile's class, Fig. 3).

    `model`/`baseline`: timm names (after ``import timm_bcos``), ``local-dir:PATH``, ``hf-hub:ID`` or
    modules. `methods`: applied to each model where applicable (``bcos`` only to B-cos models).
    """
    dev = torch.device(device) if device is not None else torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    folder = OutputFolder(out, 'evaluate')  # refused before the work, if it holds the user's files
    loaded = [('bcos', *_load(model, dev))]
    if baseline is not None:
        loaded.append(('baseline', *_load(baseline, dev)))
    if not is_bcos(loaded[0][1]):
        warnings.warn(f'{loaded[0][2]} is not a B-cos model (no bcos_cfg): no model-inherent explanations',
                      stacklevel=2)
    size = img_size or next((s for s in {input_size(m) for _, m, _ in loaded} if s), None)
    if size is None:
        raise ValueError('cannot tell the input size of the models: pass img_size')
    splits = build_datasets(data, size, augment=False)
    results: Dict[str, Any] = dict(
        settings=dict(data=data, data_description=splits.description, img_size=size, grid=grid,
                      n_grids_requested=n_grids, seed=seed, min_confidence=min_confidence, ig_steps=ig_steps,
                      smooth=default_smoothing(size) if smooth is None else smooth, batch_size=batch_size,
                      limits=dict(limits or {}), device=str(dev), torch=torch.__version__, timm=timm.__version__,
                      captum=package_version('captum')),
        models={})
    game_kwargs = dict(smooth=smooth, batch_size=batch_size, seed=seed, ig_steps=ig_steps,
                       occlusion_window=occlusion_window, occlusion_stride=occlusion_stride,
                       min_confidence=min_confidence, limits=limits, keep_maps=n_examples, progress=progress)
    boxes, arrays = {}, {}
    for key, m, name in loaded:
        entry, game = _play_model(key, m, name, splits.test, grid, n_grids, methods, game_kwargs)
        results['settings'].update(occlusion_window=game.settings['occlusion_window'],
                                   occlusion_stride=game.settings['occlusion_stride'])
        results['models'][key] = entry
        label = f'{key} ({name})'
        boxes[label] = game.scores
        arrays.update({f'{key}/{meth}': s for meth, s in game.scores.items()})
        arrays[f'{key}/labels'] = game.grids.labels.numpy()
        arrays[f'{key}/indices'] = game.grids.indices.numpy()
        if n_examples:
            _save_examples(folder, key, label, m, game, splits.classes, n_examples)
        print(f'{label}: accuracy {100 * entry["accuracy"]:.2f}%, {entry["n_grids"]} grids: ' + ', '.join(
            f'{meth} {st["mean"]:.3f} ({st["seconds_per_grid"]:.3f} s/grid)' for meth, st in entry['methods'].items()))
    write_json(folder.path('results.json'), results)
    write_atomic(folder.path('results.md'), pointing_game_markdown(results))
    write_npz(folder.path('scores.npz'), arrays)
    save_figure(plot_boxes(boxes, grid, title=f'{data}: {grid}x{grid} grid pointing game'), folder.path('boxplot.png'),
                dpi=110)
    return results
