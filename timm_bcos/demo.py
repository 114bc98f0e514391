"""`make demo`: explain the shipped images with the shipped model, offline, through the explain CLI.

    python -m timm_bcos.demo [--model bcos_simple_cifar_tiny.fashion_mnist] [--out out/demo]

The model is ``bcos_simple_cifar_tiny.fashion_mnist`` (weights in the package, trained on
Fashion-MNIST); the images are ``timm_bcos/assets/images/*.png`` (Fashion-MNIST test images,
named ``NN_<class>.png``). Runs ``timm-bcos explain`` on them (one PNG per image), then writes an
overview of all images with their explanations and checks Eq. 13 in float64.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import time
from typing import List, Optional, Sequence

import torch

from .data import demo_images
from .data import load_images

DEFAULT_MODEL = 'bcos_simple_cifar_tiny.fashion_mnist'


def _true_label(path: str, classes: Sequence[str]) -> Optional[str]:
    """The class in a shipped image's name (``03_ankle_boot.png`` -> 'Ankle boot')."""
    stem = re.sub(r'^\d+_', '', os.path.splitext(os.path.basename(path))[0])
    slugs = {re.sub(r'[^a-z0-9]+', '_', c.lower()).strip('_'): c for c in classes}
    return slugs.get(stem)


def _overview(model, x: torch.Tensor, results: List[dict], path: str) -> None:
    """One picture: every image above its explanation (the paper's colour visualisation, §4)."""
    from .explain import _matplotlib, explain

    e = explain(model, x)
    figure, canvas = _matplotlib()
    cols = 8
    rows = -(-len(x) // cols)
    fig = figure.Figure(figsize=(1.6 * cols, 3.5 * rows), layout='constrained')
    canvas(fig)
    axes = fig.subplots(2 * rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    for i, r in enumerate(results):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        top.imshow(x[i, :3].permute(1, 2, 0).numpy())
        truth = _true_label(r['image'], e.class_names or [])
        ok = truth is None or truth == r['class_name']
        top.set_title(f'{r["class_name"]}\n({r["probabilities"][0]:.2f})', fontsize=8,
                      color='black' if ok else 'red')
        rgba = e.to_rgba(index=i)
        bottom.imshow(rgba[..., :3] * rgba[..., 3:])  # on black, as in the explanation PNGs
    fig.suptitle(f'{model.pretrained_cfg.get("architecture", "")}: predicted class (sigmoid probability) and '
                 f'its explanation W(x)x; red = wrong', fontsize=9)
    tmp = path + '.tmp.png'
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default=DEFAULT_MODEL)
    parser.add_argument('--out', default=os.path.join('out', 'demo'))
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    images = demo_images()
    if not images:
        raise SystemExit('timm-bcos demo: no shipped images in timm_bcos/assets/images (broken install?)')

    from .cli import main as cli
    from .linearity import check_dynamic_linearity
    from .pretrained import load_model

    print(f'$ timm-bcos explain {len(images)} shipped images --model {args.model} --out {args.out}')
    t0 = time.perf_counter()
    cli(['explain', *images, '--model', args.model, '--out', args.out])
    seconds = time.perf_counter() - t0

    with open(os.path.join(args.out, 'results.json')) as f:
        results = json.load(f)
    model = load_model(args.model)
    classes = model.pretrained_cfg.get('label_names') or []
    truths = [_true_label(r['image'], classes) for r in results]
    correct = sum(t == r['class_name'] for t, r in zip(truths, results))
    overview = os.path.join(args.out, 'overview.png')
    x = load_images(model, images)
    _overview(model, x, results, overview)
    err64 = check_dynamic_linearity(copy.deepcopy(model).double(), x.double())
    worst = max(r['faithfulness_error'] or 0.0 for r in results)
    print()
    print(f'{correct}/{len(results)} shipped images classified correctly; explained in {seconds:.1f} s')
    print(f'dynamic linearity (Eq. 13): float32 max error {worst:.1e} per image, float64 {err64:.1e}')
    print(f'explanations: {os.path.abspath(args.out)}/<image>.png, overview: {os.path.abspath(overview)}')


if __name__ == '__main__':
    main()
