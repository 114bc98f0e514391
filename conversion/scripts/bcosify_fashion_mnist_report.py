"""Issue 15's report: B-cosified fine-tuning vs the same B-cos architecture trained from scratch.

    python conversion/scripts/bcosify_fashion_mnist_report.py OUT [--n-grids 250] [--also LABEL=DIR ...]

OUT holds the runs of ``conversion/scripts/bcosify_fashion_mnist.sh``. Writes
``conversion/results/bcosify_fashion_mnist.{md,png,json}``: test accuracy per epoch of the B-cos
runs (and the conventional original's), the epoch at which the B-cosified run first reaches the
from-scratch runs' final accuracies, the B=1 form's error against the trained original on test
images, the B-cosified model's accuracy before fine-tuning, and the B-cos models' grid pointing
game (2x2 and 3x3, their own B-cos explanations, as everywhere in this project). ``--also``:
earlier attempts (a folder with a ``conventional`` run and a ``bcosified/metrics.jsonl``, which may
be unfinished), drawn dashed.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from timm_bcos import add_inverse, bcosify  # noqa: E402
from timm_bcos._utils import save_figure, write_atomic  # noqa: E402
from timm_bcos.data import build_datasets  # noqa: E402
from timm_bcos.evaluation.bcosify_survey import b1_error  # noqa: E402
from timm_bcos.evaluation.grids import make_grids, rank_by_confidence  # noqa: E402
from timm_bcos.evaluation.localisation import summarise  # noqa: E402
from timm_bcos.evaluation.pointing_game import pointing_game  # noqa: E402
from timm_bcos.models import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / 'results'
BCOS_RUNS = {'scratch': 'B-cos from scratch', 'bcosified': 'B-cosified, fine-tuned',
             'scratch_lr1e-3': 'B-cos from scratch, lr 1e-3'}


def _history(folder: Path) -> list:
    """Per-epoch metrics of a run (``metrics.jsonl``: also of an unfinished run)."""
    rows = map(json.loads, (folder / 'metrics.jsonl').read_text().splitlines())
    return [r for r in rows if r.get('complete', True)]


def _recipe(folder: Path) -> str:
    c = json.loads((folder / 'results.json').read_text())['config']
    off = {True: '1/C', False: '0'}.get(c['off_label'], c['off_label'])
    return (f'{c["epochs"]} epochs, Adam lr {c["lr"]:g} ({c["schedule"]}), {c["loss"].upper()}'
            + (f' with off-targets {off}' if c['loss'] == 'bce' else ''))


def _localisation(model, test, grid: int, n_grids: int, label: str) -> dict:
    ranking = rank_by_confidence(model, test)
    grids = make_grids(test, model, grid, n_grids, seed=0, ranking=ranking)
    game = pointing_game(model, grids=grids, methods=('bcos',), label=f'{label} {grid}x{grid}')
    return dict(summarise(game['bcos']), grids=len(grids), eq13_error=game.eq13_error)


def _reached(curve: list, target: float):
    return next((i + 1 for i, a in enumerate(curve) if a >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', type=Path)
    parser.add_argument('--n-grids', type=int, default=250)
    parser.add_argument('--also', nargs='*', default=[], metavar='LABEL=DIR', help='earlier attempts, drawn dashed')
    parser.add_argument('--runs-at', help='the commit(s) the runs were made at (default: the current one)')
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    runs = [r for r in BCOS_RUNS if (args.out / r / 'results.json').exists()]
    acc = {r: [h['test_acc'] for h in _history(args.out / r)] for r in ['conventional'] + runs}
    data = build_datasets('fashion-mnist', 32, augment=False)
    test = data.test

    # the B-cosified model before fine-tuning: the loop's bcosify (recalibrated on 16 training images)
    original = load_model(f'local-dir:{args.out / "conventional"}')
    images = torch.stack([data.train[i][0] for i in range(16)])
    carried = b1_error(original, bcosify(copy.deepcopy(original), b=1.0, preserve_function=True),
                       torch.stack([test[i][0] for i in range(64)]))
    start = rank_by_confidence(bcosify(copy.deepcopy(original), calibration_data=add_inverse(images)), test,
                               correct_only=False).accuracy
    games = {r: {g: _localisation(load_model(f'local-dir:{args.out / r}'), test, g, args.n_grids, r) for g in (2, 3)}
             for r in runs}

    epochs = len(acc['scratch'])
    target = acc['scratch'][-1]
    best = max(acc[r][-1] for r in runs if r.startswith('scratch'))
    reached, reached_best = _reached(acc['bcosified'], target), _reached(acc['bcosified'], best)
    earlier = {}
    for item in args.also:
        label, _, folder = item.partition('=')
        earlier[label] = dict(bcosified=[h['test_acc'] for h in _history(Path(folder) / 'bcosified')],
                              original=_history(Path(folder) / 'conventional')[-1])
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()

    fig, ax = plt.subplots(figsize=(7, 4.4))
    for r, style in zip(runs, ('o-', 's-', 'o:')):
        first = [start] if r == 'bcosified' else [None]
        ax.plot(range(0, len(acc[r]) + 1), first + acc[r], style, label=BCOS_RUNS[r])
    for i, (label, e) in enumerate(earlier.items()):
        ax.plot(range(1, len(e['bcosified']) + 1), e['bcosified'], 'x--', alpha=0.6, color=f'C{3 + i}',
                label=f'B-cosified: {label}')
    ax.axhline(acc['conventional'][-1], color='gray', ls='--', label='conventional resnet18 (the original)')
    ax.set(xlabel='epoch (epoch 0: B-cosified, before fine-tuning)', ylabel='test accuracy',
           ylim=(min(start, 0.5) - 0.03, 0.95), title='Fashion-MNIST 32 px: B-cosification vs training from scratch')
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    save_figure(fig, RESULTS / 'bcosify_fashion_mnist.png')

    ok_epochs = reached is not None and reached <= epochs / 3
    ok_loc = all(games['bcosified'][g]['mean'] >= games['scratch'][g]['mean'] for g in (2, 3))
    header = ['epoch', 'conventional'] + [BCOS_RUNS[r] for r in runs]
    rows = [f'| {e + 1} | ' + ' | '.join(f'{acc[r][e]:.4f}' if e < len(acc[r]) else '-' for r in acc) + ' |'
            for e in range(max(map(len, acc.values())))]
    loc = [f'| {BCOS_RUNS[r]} | {g}x{g} | {games[r][g]["mean"]:.3f} | {games[r][g]["median"]:.3f} | '
           f'{games[r][g]["grids"]} | {games[r][g]["eq13_error"]:.1e} |' for r in runs for g in (2, 3)]
    attempts = [f'- {label}: the original at {e["original"]["test_acc"]:.4f} test / {e["original"]["train_acc"]:.4f} '
                f'train accuracy; B-cosified and fine-tuned it reached '
                + ', '.join(f'{a:.4f}' for a in e['bcosified']) + f' after epochs 1-{len(e["bcosified"])} (stopped).'
                for label, e in earlier.items()]
    text = '\n'.join([
        '# B-cosification vs training from scratch (Fashion-MNIST, 32 px, timm resnet18)', '',
        f'Runs: `bash conversion/scripts/bcosify_fashion_mnist.sh OUT` ({args.runs_at or commit}); report: '
        f'`python conversion/scripts/bcosify_fashion_mnist_report.py OUT` at {commit}. CPU, 2 cores. '
        f'All runs train on the same fixed random 20,000 of the 60,000 training images (batch 256, random crop '
        f'+ flip) and are tested on all 10,000 test images.', '',
        '- *conventional* (the original): timm `resnet18`, ' + _recipe(args.out / 'conventional') + '.',
        '- the B-cos architecture of all B-cos runs: `timm_bcos.bcosify` with its defaults (B=2, biases removed, '
        'BatchNorm uncentered, ReLU kept as a gate, average pools, logit bias -log 9), recalibrated on 16 '
        'training images.',
        *[f'- *{BCOS_RUNS[r]}*: ' + ('the conventional weights' if r == 'bcosified' else 'random weights') + '; '
          + _recipe(args.out / r) + '.' for r in runs],
        '', 'The recipe of *from scratch* and *B-cosified* is the same: `timm-bcos train --bcosify`\'s defaults '
        '(B-cosification\'s fine-tuning recipe). *from scratch, lr 1e-3* is a stronger from-scratch recipe, kept '
        'as a second bar.', '', '## Result', '',
        f'- Same recipe: the from-scratch model ends at **{target:.4f}** (epoch {epochs}); the B-cosified model '
        f'reaches that at epoch **{reached}** of {epochs} ({"<=" if ok_epochs else ">"} 1/3 of the epochs: target '
        f'{"met" if ok_epochs else "missed"}) and ends at {acc["bcosified"][-1]:.4f}.',
        f'- Against the best from-scratch run ({best:.4f}): reached at epoch {reached_best}.',
        f'- The conventional original: {acc["conventional"][-1]:.4f}. Its B=1 form (`bcosify(b=1, '
        f'preserve_function=True)`) on 64 test images: {carried:.1e} relative logit error. B-cosified at B=2 before '
        f'fine-tuning (recalibrated; epoch 0 in the plot): {start:.4f}.',
        f'- Grid pointing game (mean localisation of the B-cos explanations): the B-cosified model '
        f'{"matches or beats" if ok_loc else "is below"} the same-recipe from-scratch model on both grids; '
        + '; '.join(f'against *{BCOS_RUNS[r]}*: ' + ', '.join(
            f'{g}x{g} {games["bcosified"][g]["mean"]:.3f} vs {games[r][g]["mean"]:.3f}' for g in (2, 3))
            for r in runs if r != 'bcosified') + '.',
        *(['', 'Earlier attempts (fine-tuned at lr 1e-3 with 0 off-targets, dashed in the plot):', *attempts]
          if attempts else []), '',
        '![accuracy per epoch](bcosify_fashion_mnist.png)', '',
        '| ' + ' | '.join(header) + ' |', '|' + '---:|' * len(header), *rows, '',
        f'## Grid pointing game ({args.n_grids} grids each, each model on its own most confident correct test images)',
        '', '| model | grid | mean | median | grids | Eq. 13 error |', '|---|---|---:|---:|---:|---:|', *loc, '',
    ])
    write_atomic(RESULTS / 'bcosify_fashion_mnist.md', text.encode())
    write_atomic(RESULTS / 'bcosify_fashion_mnist.json', json.dumps(dict(
        accuracy=acc, earlier_attempts=earlier, start_accuracy=start, target=target, reached_epoch=reached,
        best_scratch=best, reached_best_epoch=reached_best, b1_error=carried, localisation=games, commit=commit),
        indent=2).encode())
    print(text)


if __name__ == '__main__':
    main()
