"""The B ablation (paper §5.1, Tab. 1 / Fig. 5): train the simple B-cos net for each B, then its
accuracy and the localisation of its model-inherent explanations (Eq. 15) in the pointing game."""
from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import timm
import torch

from .. import training
from .._utils import OutputFolder, save_figure, write_atomic, write_json
from ..data import build_datasets, count_classes
from ..models import load_model
from ..weights.v1 import V1_CIFAR_BS, v1_cifar_settings
from .grids import make_grids, rank_by_confidence
from .inputs import encode_input, input_size, stack_items
from .localisation import summarise
from .plots import plot_ablation
from .pointing_game import pointing_game
from .report import ablation_markdown, write_npz

__all__ = ['ablation_model_kwargs', 'b_ablation']


def ablation_model_kwargs(b: float, max_out: int = 2) -> Dict[str, Any]:
    """v1's CIFAR-10 settings for B (`v1_cifar_settings`) with MaxOut `max_out`: layer scale
    ``10**(-2 + 1.5 * (2.5 - B))`` (a fixed output divisor, `BcosSimpleNet`'s ``scale``) and logit
    temperature ``10**T`` (B=1..2.5; another B is a ValueError)."""
    s = v1_cifar_settings(b)
    return dict(b=s['b'], max_out=max_out, scale=s['scale'], logit_temperature=s['logit_temperature'])


@dataclass
class _RunScores:
    """One run's evaluation: ``bcos`` localisation scores (grids, grid**2), test accuracy, grid count, Eq. 13 error."""

    scores: np.ndarray
    accuracy: float
    n_grids: int
    eq13_error: Optional[float]


def _run_name(b: float, max_out: int) -> str:
    return f'B{b:.2f}-' + ('plain' if max_out == 1 else f'M{max_out}')


def _calibrated_temperature(model: str, kwargs: Dict[str, Any], data: str, img_size: Optional[int],
                            seed: int) -> float:
    """The logit temperature that gives the initial logits (minus the bias) unit std on 256 training images.

    The network is initialised as `timm_bcos.training.train` does (``set_seed(seed)``, then
    ``create_model``), so this is the network that training starts from.
    """
    from accelerate.utils import set_seed

    set_seed(seed)
    net = timm.create_model(model, num_classes=count_classes(data), **dict(kwargs, logit_temperature=None)).eval()
    size = img_size or input_size(net)
    train_set = build_datasets(data, size, augment=False).train
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:256]
    x, _ = stack_items(train_set, pick.tolist())
    with torch.no_grad():
        out = net(encode_input(net, x)).double()
    bias = getattr(getattr(net, 'logit', None), 'bias', None) or 0.0
    std = float((out - bias).std())
    if not (math.isfinite(std) and std > 0):
        raise RuntimeError(f'cannot calibrate the logit temperature of {model} {kwargs}: initial logit std {std}')
    return float(f'{std:.3g}')


def _finished_run(run: Path, cfg: training.TrainConfig) -> Optional[Dict[str, Any]]:
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


def _train_run(cfg: training.TrainConfig, name: str) -> Dict[str, Any]:
    """Train one run with `timm_bcos.training.train` unless it has finished (an interrupted one
    resumes from its last epoch); returns its results.json."""
    run = Path(cfg.output)
    done = _finished_run(run, cfg)
    if done is None:
        print(f'ablation: training {name} -> {run}')
        training.train(cfg)
        done = _finished_run(run, cfg)
        if done is None and cfg.max_steps is None:
            raise RuntimeError(f'{run}: training did not finish')
    else:
        print(f'ablation: {name} already trained ({run})')
    return json.loads((run / 'results.json').read_text())


def _localise_run(run: Path, name: str, data: str, img_size: Optional[int], datasets: Dict[int, Any], *, grid: int,
                  n_grids: int, seed: int, min_confidence: float, batch_size: int, progress: bool) -> _RunScores:
    """Accuracy and ``bcos`` pointing game of the trained run (no scores when too few classes are
    classified correctly for a grid). `datasets` caches the data per image size across runs."""
    net = load_model(f'local-dir:{run}')
    size = input_size(net) or img_size
    if size not in datasets:
        datasets[size] = build_datasets(data, size, augment=False)
    test = datasets[size].test
    ranking = rank_by_confidence(net, test, progress=progress)
    try:
        grids = make_grids(test, net, grid, n_grids, seed, min_confidence=min_confidence, ranking=ranking)
    except ValueError as e:  # too few classes classified correctly: no grid
        warnings.warn(f'{name}: no localisation ({e})', stacklevel=4)  # (b_ablation's caller)
        return _RunScores(np.zeros((0, grid * grid)), ranking.accuracy, 0, None)
    game = pointing_game(net, grids=grids, methods=('bcos',), batch_size=batch_size, progress=progress, label=name)
    err = game.eq13_error if game.eq13_error is not None and math.isfinite(game.eq13_error) else None
    return _RunScores(game['bcos'], ranking.accuracy, len(grids), err)


def _evaluate_run(run: Path, name: str, weights: Optional[str], data: str, img_size: Optional[int],
                  datasets: Dict[int, Any], **evaluation) -> _RunScores:
    """`_localise_run`, cached in ``localisation_<g>x<g>.json`` / ``.npy`` next to the run (recomputed
    when the evaluation settings or the weights change)."""
    grid = evaluation['grid']
    settings = dict(grid=grid, n_grids=evaluation['n_grids'], seed=evaluation['seed'],
                    min_confidence=evaluation['min_confidence'], weights=weights)
    cache, cache_npy = run / f'localisation_{grid}x{grid}.json', run / f'localisation_{grid}x{grid}.npy'
    cached = json.loads(cache.read_text()) if cache.exists() else None
    if cached is not None and cached.get('settings') == settings and cache_npy.exists():
        print(f'ablation: {name} localisation cached')
        return _RunScores(np.load(cache_npy), cached['accuracy'], cached['n_grids'], cached.get('eq13_error'))
    result = _localise_run(run, name, data, img_size, datasets, **evaluation)
    buf = io.BytesIO()
    np.save(buf, result.scores)
    write_atomic(cache_npy, buf.getvalue())
    write_json(cache, dict(settings=settings, accuracy=result.accuracy, n_grids=result.n_grids,
                           eq13_error=result.eq13_error, summary=summarise(result.scores)))
    return result


def _write_ablation(out: OutputFolder, result: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> None:
    """``ablation.json``, ``ablation.md``, ``scores.npz`` (scores per run) and ``ablation.png`` in `out`."""
    write_json(out.path('ablation.json'), result)
    write_atomic(out.path('ablation.md'), ablation_markdown(result))
    write_npz(out.path('scores.npz'), arrays)
    s = result['settings']
    save_figure(plot_ablation(result['runs'], arrays, s['grid'], s['data']), out.path('ablation.png'), dpi=110)


def b_ablation(out: Union[str, Path] = 'out/ablation', data: str = 'fashion-mnist', *,
               bs: Sequence[float] = V1_CIFAR_BS, plain: bool = True, runs_dir: Union[str, Path, None] = None,
               model: str = 'bcos_simple_cifar_tiny', img_size: Optional[int] = None, epochs: int = 3,
               batch_size: int = 128, lr: float = 1e-3, lr_base_batch: Optional[int] = None,
               schedule: str = 'cosine', warmup_epochs: float = 0.0, train_subset: Optional[int] = None,
               max_steps: Optional[int] = None, seed: int = 0, grid: int = 3, n_grids: int = 250,
               eval_batch_size: int = 64, min_confidence: float = 0.0, model_kwargs: Optional[Dict[str, Any]] = None,
               calibrate_temperature: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Fig. 5: train the simple B-cos net for each B (MaxOut 2) and plain B=2, then accuracy and ``bcos`` localisation.

    Each run trains with `timm_bcos.training.train` (BCE, Adam; per-B scale and logit temperature
    from `ablation_model_kwargs`) into ``runs_dir/<B>-<M2|plain>/`` (default ``out/runs``): a
    finished run (results.json with ``finished``) is not trained again, an interrupted one resumes
    from its last epoch; a finished run with another config is an error (delete it or use another
    runs_dir). Its evaluation is cached in ``localisation_<g>x<g>.json`` next to it (recomputed
    when the evaluation settings change). Writes (to `out`: new, empty or an earlier ablation
    output) ``ablation.json``, ``ablation.md``,
    ``ablation.png`` (accuracy crosses and localisation box plots against B) and ``scores.npz`` to `out`.

    `calibrate_temperature`: instead of v1's per-B logit temperature (tuned for the 64-256 wide
    CIFAR-10 net), use the one that gives the initial network logits (minus the bias) a standard
    deviation of 1 on 256 training images (3 significant digits; the layer scales stay v1's).
    A model that classifies too few classes correctly for a grid gets no localisation scores
    (recorded, not an error).
    """
    folder = OutputFolder(out, 'ablation')  # refused now, not after the training, if it holds the user's files
    runs = Path(runs_dir) if runs_dir is not None else folder.path('runs')
    evaluation = dict(grid=grid, n_grids=n_grids, seed=seed, min_confidence=min_confidence,
                      batch_size=eval_batch_size, progress=progress)
    entries: List[Dict[str, Any]] = []
    arrays: Dict[str, np.ndarray] = {}
    datasets: Dict[int, Any] = {}
    for b, max_out in ([(2.0, 1)] if plain else []) + [(float(b), 2) for b in bs]:
        name = _run_name(b, max_out)
        run = runs / name
        kwargs = dict(ablation_model_kwargs(b, max_out), **(model_kwargs or {}))
        if calibrate_temperature:
            kwargs['logit_temperature'] = _calibrated_temperature(model, kwargs, data, img_size, seed)
        cfg = training.TrainConfig(model=model, model_kwargs=kwargs, data=data, img_size=img_size, epochs=epochs,
                                   batch_size=batch_size, lr=lr, lr_base_batch=lr_base_batch, schedule=schedule,
                                   warmup_epochs=warmup_epochs, train_subset=train_subset, loss='bce', seed=seed,
                                   output=str(run), resume=True, max_steps=max_steps, progress=progress)
        trained = _train_run(cfg, name)
        metrics = trained['metrics']
        r = _evaluate_run(run, name, metrics.get('weights_sha256'), data, img_size, datasets, **evaluation)
        arrays[name] = r.scores
        entries.append(dict(name=name, b=b, max_out=max_out, model_kwargs=kwargs, accuracy=r.accuracy,
                            train_test_acc=metrics.get('test_acc'), epochs=metrics.get('epochs_completed'),
                            train_seconds=sum(h.get('seconds', 0) for h in trained.get('history', [])),
                            n_grids=r.n_grids, eq13_error=r.eq13_error, localisation=summarise(r.scores),
                            run=str(run)))
        loc = f'{float(np.mean(r.scores)):.3f}' if np.size(r.scores) else 'n/a (no grid)'
        print(f'ablation: {name}: accuracy {100 * r.accuracy:.2f}%, localisation mean {loc}')
    result = dict(settings=dict(data=data, model=model, epochs=epochs, batch_size=batch_size, lr=lr,
                                lr_base_batch=lr_base_batch, schedule=schedule, warmup_epochs=warmup_epochs,
                                train_subset=train_subset, max_steps=max_steps, seed=seed, grid=grid,
                                n_grids=n_grids, min_confidence=min_confidence, model_kwargs=model_kwargs or {},
                                calibrate_temperature=calibrate_temperature),
                  runs=entries)
    _write_ablation(folder, result, arrays)
    return result
