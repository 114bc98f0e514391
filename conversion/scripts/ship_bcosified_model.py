"""Ship the B-cosified tag: the fine-tuned run of bcosify_fashion_mnist.sh -> package weights, card.

    bash conversion/scripts/bcosify_fashion_mnist.sh OUT
    python conversion/scripts/bcosify_fashion_mnist_report.py OUT
    python conversion/scripts/ship_bcosified_model.py OUT

Writes ``timm_bcos/assets/weights/bcos_resnet18.fashion_mnist_bcosified.safetensors`` (the run's
weights in float16, half the size; scales and temperatures stay float64) and
``hub_cards/bcos_resnet18.fashion_mnist_bcosified/``: the model card (`timm_bcos.hub.publish` dry
run, no weights) and ``metrics.json``: the shipped weights' test accuracy measured here through
timm's loading path, next to the conventional original's and the from-scratch B-cos model's, and
the Eq. 13 errors.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from ship_default_model import _accuracy, _training_summary

from timm_bcos._utils import write_atomic, write_json

ROOT = Path(__file__).resolve().parents[2]
NAME = 'bcos_resnet18.fashion_mnist_bcosified'


def main(argv=None) -> None:
    import timm
    from safetensors.torch import load_file, save

    import timm_bcos
    from timm_bcos.convert import bcosify_args
    from timm_bcos.data import load_fashion_mnist
    from timm_bcos.hub import card_metrics, publish
    from timm_bcos.models.bcos_models import BCOSIFIED_TAGS

    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('out', type=Path, help='the output folder of bcosify_fashion_mnist.sh')
    p.add_argument('--repo-id', default=f'timm-bcos/{NAME.replace(".", "-")}')
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    names = ('bcosified', 'conventional', 'scratch', 'scratch_lr1e-3')
    run, conventional, scratch, strong = (args.out / r for r in names)

    # 1. weights: float16 copies of the run's float32 tensors
    trained = timm.create_model(f'local-dir:{run}', pretrained=True)
    if bcosify_args(trained) != BCOSIFIED_TAGS[NAME]:
        raise SystemExit(f'the run was B-cosified with {bcosify_args(trained)}, the tag builds {BCOSIFIED_TAGS[NAME]}')
    state = load_file(str(run / 'model.safetensors'))
    state = {k: v.half() if v.dtype == torch.float32 else v for k, v in state.items()}
    target = Path(timm.models.get_pretrained_cfg(NAME).file)
    write_atomic(target, save(state, metadata=dict(format='pt', model=NAME)))
    print(f'weights: {target} ({target.stat().st_size / 1e6:.1f} MB)')

    # 2. accuracy through timm's loading paths, on all 10,000 test images
    _, _, x_test, y_test = load_fashion_mnist(32)
    model = timm.create_model(NAME, pretrained=True)
    acc = _accuracy(model, x_test, y_test, True)
    run_acc = _accuracy(trained, x_test, y_test, True)
    base_acc = _accuracy(timm.create_model(f'local-dir:{conventional}', pretrained=True), x_test, y_test, False)
    scratch_acc = _accuracy(timm.create_model(f'local-dir:{scratch}', pretrained=True), x_test, y_test, True)
    strong_acc = _accuracy(timm.create_model(f'local-dir:{strong}', pretrained=True), x_test, y_test, True)
    x = x_test[:16].float().div(255).repeat(1, 3, 1, 1)
    err32 = timm_bcos.check_dynamic_linearity(model, timm_bcos.AddInverse()(x))
    err64 = timm_bcos.check_dynamic_linearity(copy.deepcopy(model).double(), timm_bcos.AddInverse()(x.double()))
    print(f'test accuracy: shipped (float16) {acc:.4f}, run (float32) {run_acc:.4f}, conventional original '
          f'{base_acc:.4f}, B-cos from scratch {scratch_acc:.4f}; Eq. 13 error float32 {err32:.1e}, '
          f'float64 {err64:.1e}')

    # 3. model card (dry run, no weights: they ship in the package) and metrics
    report = json.loads((ROOT / 'conversion' / 'results' / 'bcosify_fashion_mnist.json').read_text())
    loc = report['localisation']
    metrics = card_metrics(json.loads((run / 'results.json').read_text()))
    metrics.update(
        dataset='fashion_mnist', test_accuracy=round(acc, 4),
        conventional_original_test_accuracy=f'{base_acc:.4f} (timm resnet18, cross entropy: the weights it was '
                                            f'B-cosified from)',
        from_scratch_test_accuracy=f'{scratch_acc:.4f} (the same B-cos architecture and recipe from random weights; '
                                   f'with lr 1e-3 instead of 1e-4: {strong_acc:.4f})',
        **{f'pointing_game_{g}x{g}': f'{loc["bcosified"][g]["mean"]:.3f} (from scratch: '
                                     f'{loc["scratch"][g]["mean"]:.3f}, with lr 1e-3: '
                                     f'{loc["scratch_lr1e-3"][g]["mean"]:.3f}; '
                                     f'conversion/results/bcosify_fashion_mnist.md)' for g in ('2', '3')})
    rendered = Path(publish(model, args.repo_id, metrics=metrics, dry_run=True, weights=False))
    card_dir = ROOT / 'hub_cards' / NAME
    card_dir.mkdir(parents=True, exist_ok=True)
    for name in ('README.md', 'config.json', 'explanation.png'):
        write_atomic(card_dir / name, (rendered / name).read_bytes())
    write_json(card_dir / 'metrics.json', dict(
        model=NAME, test_accuracy=acc, run_test_accuracy=run_acc, test_images=len(y_test), weights='float16',
        params=sum(p.numel() for p in model.parameters()), eq13_error=dict(float32=err32, float64=err64),
        training=_training_summary(run),
        conventional=dict(model='resnet18', test_accuracy=base_acc, training=_training_summary(conventional)),
        from_scratch=dict(test_accuracy=scratch_acc, training=_training_summary(scratch)),
        from_scratch_lr1e_3=dict(test_accuracy=strong_acc, training=_training_summary(strong)),
        experiment='conversion/results/bcosify_fashion_mnist.md'))
    print(f'card and metrics: {card_dir}')


if __name__ == '__main__':
    main()
