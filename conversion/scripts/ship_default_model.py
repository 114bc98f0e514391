"""Ship the default model: finished training runs -> package weights, recipes, images, metrics, card.

    timm-bcos train --config conversion/recipes/bcos_simple_cifar_tiny.fashion_mnist.json --output runs/bcos
    timm-bcos train --config conversion/recipes/baseline_simple_cifar_tiny.fashion_mnist.json --output runs/base
    python conversion/scripts/ship_default_model.py --bcos-run runs/bcos --baseline-run runs/base \
        --pointing conversion/results/pointing_2x2 conversion/results/pointing_3x3

Writes ``timm_bcos/assets/weights/bcos_simple_cifar_tiny.fashion_mnist.safetensors`` (the weights of the
``.fashion_mnist`` tag), the two recipes (each run's exact config), 16 Fashion-MNIST test images
``timm_bcos/assets/images/NN_<class>.png``, and ``hub_cards/bcos_simple_cifar_tiny.fashion_mnist/``:
the model card (`timm_bcos.hub.publish` dry run, no weights) and ``metrics.json`` (both models'
test accuracy measured here through timm's loading paths, training time, images/s, Eq. 13 errors).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import numpy as np
import torch

from timm_bcos._utils import ASSETS, write_atomic, write_json
from timm_bcos.layers import add_inverse

ROOT = Path(__file__).resolve().parents[2]
NAME = 'bcos_simple_cifar_tiny.fashion_mnist'
BASELINE = 'baseline_simple_cifar_tiny.fashion_mnist'
RUN_ONLY = ('output', 'resume', 'overwrite', 'progress', 'max_steps', 'cpu', 'num_workers')


def _recipe(run: Path) -> dict:
    config = json.loads((run / 'results.json').read_text())['config']
    return {k: v for k, v in config.items() if k not in RUN_ONLY}


@torch.no_grad()
def _accuracy(model, x: torch.Tensor, y: torch.Tensor, encode: bool) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 500):
        xb = x[i:i + 500].float().div(255).repeat(1, 3, 1, 1)
        xb = add_inverse(xb) if encode else xb
        correct += (model(xb).argmax(1) == y[i:i + 500]).sum().item()
    return correct / len(x)


def _training_summary(run: Path) -> dict:
    results = json.loads((run / 'results.json').read_text())
    history = results['history']
    return dict(train_seconds=round(sum(r['seconds'] for r in history), 1),
                train_images_per_s=round(float(np.mean([r['images_per_s'] for r in history])), 1),
                epochs=results['metrics']['epochs_completed'], final_train_acc=round(history[-1]['train_acc'], 4),
                run_test_acc=results['metrics']['test_acc'], hardware=results['environment'])


def _pointing_metrics(folder: Path) -> dict:
    """The card's line for one grid pointing game: B-cos contributions vs the best post-hoc method."""
    results = json.loads((folder / 'results.json').read_text())
    grid = results['settings']['grid']
    models = results['models']
    ours = models['bcos']['methods']['bcos']
    best = max(((f'{key}/{m}', v['mean']) for key, e in models.items() for m, v in e['methods'].items()
                if m != 'bcos'), key=lambda kv: kv[1])
    return {f'pointing_game_{grid}x{grid}': f'{ours["mean"]:.3f} mean over {ours["n"]} scores (best post-hoc: '
                                            f'{best[0]} {best[1]:.3f}; conversion/results/{folder.name})'}


def main(argv=None) -> None:
    import timm
    from safetensors.torch import load_file, save

    import timm_bcos
    from timm_bcos.data import FASHION_MNIST_CLASSES, load_fashion_mnist
    from timm_bcos.hub import card_metrics, publish

    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--bcos-run', required=True, type=Path)
    p.add_argument('--baseline-run', required=True, type=Path)
    p.add_argument('--repo-id', default=f'timm-bcos/{NAME.replace(".", "-")}')
    p.add_argument('--pointing', nargs='*', type=Path, default=[],
                   help='timm-bcos evaluate output folders: their B-cos pointing-game scores go into the card')
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)

    # 1. weights: the run's final state dict, re-saved atomically as the tag's file
    target = Path(timm.models.get_pretrained_cfg(NAME).file)
    state = load_file(str(args.bcos_run / 'model.safetensors'))
    write_atomic(target, save(state, metadata=dict(format='pt', model=NAME)))
    print(f'weights: {target} ({target.stat().st_size / 1e6:.2f} MB)')

    # 2. recipes
    recipes = ROOT / 'conversion' / 'recipes'
    write_json(recipes / f'{NAME}.json', _recipe(args.bcos_run))
    write_json(recipes / f'{BASELINE}.json', _recipe(args.baseline_run))

    # 3. accuracy of both models through timm's loading paths, on all 10,000 test images
    _, _, x_test, y_test = load_fashion_mnist(32)
    model = timm.create_model(NAME, pretrained=True)
    baseline = timm.create_model(f'local-dir:{args.baseline_run}', pretrained=True)
    acc, base_acc = _accuracy(model, x_test, y_test, True), _accuracy(baseline, x_test, y_test, False)
    x = x_test[:64].float().div(255).repeat(1, 3, 1, 1)
    err32 = timm_bcos.check_dynamic_linearity(model, timm_bcos.AddInverse()(x))
    err64 = timm_bcos.check_dynamic_linearity(copy.deepcopy(model).double(), timm_bcos.AddInverse()(x.double()))
    print(f'test accuracy: B-cos {acc:.4f}, baseline {base_acc:.4f}; Eq. 13 error float32 {err32:.1e}, '
          f'float64 {err64:.1e}')

    # 4. demo images: the first test image of each class, then the second of the first six classes
    from PIL import Image
    images = ASSETS / 'images'
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob('*.png'):
        old.unlink()
    picks = [int((y_test == c).nonzero()[0]) for c in range(10)] + [int((y_test == c).nonzero()[1]) for c in range(6)]
    for i, idx in enumerate(picks):
        slug = re.sub(r'[^a-z0-9]+', '_', FASHION_MNIST_CLASSES[int(y_test[idx])].lower()).strip('_')
        Image.fromarray(x_test[idx, 0].numpy()).save(images / f'{i:02d}_{slug}.png')
    print(f'images: {len(picks)} in {images}')

    # 5. model card (dry run, no weights: the weights ship in the package) and metrics
    card_dir = ROOT / 'hub_cards' / NAME
    metrics = card_metrics(json.loads((args.bcos_run / 'results.json').read_text()))
    metrics.update(dataset='fashion_mnist', test_accuracy=round(acc, 4),
                   baseline_test_accuracy=f'{base_acc:.4f} (baseline_simple_cifar_tiny, same layout, '
                                          f'conv+BN+ReLU, cross entropy, same budget)')
    for folder in args.pointing:
        metrics.update(_pointing_metrics(folder))
    examples = sorted(str(p) for p in images.glob('*.png'))[:2]
    # into a new temporary folder (hub_cards/NAME holds more than the card), then the card's files
    rendered = Path(publish(model, args.repo_id, metrics=metrics, images=examples, dry_run=True, weights=False))
    for name in ('README.md', 'config.json', 'explanation.png'):
        write_atomic(card_dir / name, (rendered / name).read_bytes())
    write_json(card_dir / 'metrics.json', dict(
        model=NAME, test_accuracy=acc, test_images=len(y_test),
        params=sum(p.numel() for p in model.parameters()),
        eq13_error=dict(float32=err32, float64=err64),
        training=_training_summary(args.bcos_run),
        baseline=dict(model='baseline_simple_cifar_tiny', test_accuracy=base_acc,
                      params=sum(p.numel() for p in baseline.parameters()),
                      training=_training_summary(args.baseline_run)),
        recipes=[f'conversion/recipes/{NAME}.json', f'conversion/recipes/{BASELINE}.json']))
    print(f'card and metrics: {card_dir}')


if __name__ == '__main__':
    main()
