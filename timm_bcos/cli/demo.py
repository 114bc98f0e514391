"""`make demo`: explain the shipped images with the shipped model, offline.

    timm-bcos demo [--model bcos_simple_cifar_tiny.fashion_mnist] [--out out/demo]

The model is ``bcos_simple_cifar_tiny.fashion_mnist`` (weights in the package, trained on
Fashion-MNIST); the images are ``timm_bcos/assets/images/*.png`` (Fashion-MNIST test images,
named ``NN_<class>.png``). Writes what ``timm-bcos explain`` writes (one PNG per image and
``results.json``), then an overview of all images with their explanations, and checks Eq. 13 in
float64.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import time
from typing import List, Optional, Sequence

import torch

from .._utils import OutputFolder, save_figure, write_json
from ..data import demo_images, load_images
from ..explain import check_dynamic_linearity, describe, explain, save_explanations
from ..explain.files import earlier_explanations
from ..models import load_model

DEFAULT_MODEL = 'bcos_simple_cifar_tiny.fashion_mnist'


def _true_label(path: str, classes: Sequence[str]) -> Optional[str]:
    """The class in a shipped image's name (``03_ankle_boot.png`` -> 'Ankle boot')."""
    stem = re.sub(r'^\d+_', '', os.path.splitext(os.path.basename(path))[0])
    slugs = {re.sub(r'[^a-z0-9]+', '_', c.lower()).strip('_'): c for c in classes}
    return slugs.get(stem)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog='timm-bcos demo', description=__doc__.split('\n')[0])
    parser.add_argument('--model', default=DEFAULT_MODEL)
    parser.add_argument('--out', default=os.path.join('out', 'demo'))
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    images = demo_images()
    if not images:
        raise SystemExit('timm-bcos demo: no shipped images in timm_bcos/assets/images (broken install?)')

    print(f'explaining {len(images)} shipped images with {args.model} -> {args.out}')
    t0 = time.perf_counter()
    model = load_model(args.model)
    x = load_images(model, images)
    e = explain(model, x)
    folder = OutputFolder(args.out, 'explain', legacy=earlier_explanations)
    results = save_explanations(e, images, folder)
    write_json(folder.path('results.json'), results)
    seconds = time.perf_counter() - t0
    for r in results:
        print(describe(r))

    truths = [_true_label(r['image'], e.class_names or []) for r in results]
    correct = sum(t == r['class_name'] for t, r in zip(truths, results))
    overview = folder.path('overview.png')
    fig = e.plot_overview(
        [f'{r["class_name"]}\n({r["probabilities"][0]:.2f})' for r in results],
        [t is not None and t != r['class_name'] for t, r in zip(truths, results)],
        f'{model.pretrained_cfg.get("architecture", "")}: predicted class (sigmoid probability) and its explanation '
        f'W(x)x; red = wrong')
    save_figure(fig, overview)
    err64 = check_dynamic_linearity(copy.deepcopy(model).double(), x.double())
    worst = max(r['eq13_error'] or 0.0 for r in results)
    print()
    print(f'{correct}/{len(results)} shipped images classified correctly; explained in {seconds:.1f} s')
    print(f'dynamic linearity (Eq. 13): float32 max error {worst:.1e} per image, float64 {err64:.1e}')
    print(f'explanations: {os.path.abspath(args.out)}/<image>.png, results: {args.out}/results.json, '
          f'overview: {os.path.abspath(overview)}')

