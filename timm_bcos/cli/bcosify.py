"""`timm-bcos bcosify`: B-cosify a trained model and save it in timm's Hub format.

    timm-bcos bcosify MODEL --out DIR [--checkpoint FILE] [--num-classes N] [--b B]
                      [--preserve-function] [--option KEY=VALUE ...]

MODEL is a timm name with weights (``resnet50.a1_in1k``), ``local-dir:PATH`` or ``hf-hub:ID``
(offline: from the local caches), or any architecture with ``--checkpoint FILE``. The output loads
back with ``timm.create_model('local-dir:DIR', pretrained=True)`` after ``import timm_bcos`` and
fine-tunes with ``timm-bcos train --model local-dir:DIR --pretrained``. Before saving it checks the
result on seeded noise images: the function-preserving B=1 form against the original (the weights
were carried over), and the requested form's float64 Eq. 13 error and initial logit spread.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import List, Optional

import torch

from .._utils import OutputFolder, parse_kwargs

__all__ = ['main']


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='timm-bcos bcosify', description=__doc__.split('\n')[0])
    p.add_argument('model', help='a timm name with pretrained weights, local-dir:PATH or hf-hub:ID')
    p.add_argument('--out', required=True, help='output folder: new, empty, or an earlier bcosify output')
    p.add_argument('--checkpoint', help="the model's weights (safetensors), for a name without them")
    p.add_argument('--num-classes', type=int, help="the checkpoint's class count")
    p.add_argument('--b', type=float, default=2.0, help='the exponent B (default 2)')
    p.add_argument('--preserve-function', action='store_true',
                   help='save the function-preserving B=1 form (biases, norms, activations kept)')
    p.add_argument('--option', nargs='*', default=[], metavar='KV',
                   help='more timm_bcos.bcosify options KEY=VALUE (JSON or a string), e.g. activations=remove '
                        'norm=none normalized=true')
    return p


def main(argv: Optional[List[str]] = None) -> None:
    import timm

    from ..convert import bcosify
    from ..evaluation.bcosify_survey import b1_error
    from ..evaluation.coverage import eq13_autograd, logit_spread
    from ..layers import add_inverse
    from ..models import load_model
    from ..models.export import save_pretrained

    args = _parser().parse_args(argv)
    options = parse_kwargs(args.option, '--option')
    folder = OutputFolder(args.out, 'bcosify')  # refused before any work if it holds the user's files
    torch.set_flush_denormal(True)
    name = args.model
    if args.checkpoint is None and ':' not in name and timm.is_model(name.split('.')[0]) and \
            not getattr(timm.models.get_pretrained_cfg(name), 'has_weights', False):
        raise ValueError(f'{name} has no pretrained weights: B-cosification starts from a trained model (a tag with '
                         f'weights, local-dir:PATH, hf-hub:ID, or --checkpoint FILE)')
    kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    original = load_model(name, args.checkpoint, **kwargs)
    size = tuple(original.pretrained_cfg['input_size'][1:])
    images = torch.rand(4, len(options.get('mean') or original.pretrained_cfg.get('mean') or (0,) * 3), *size,
                        generator=torch.Generator().manual_seed(1))

    t0 = time.perf_counter()
    b1 = bcosify(copy.deepcopy(original), b=1.0, preserve_function=True,
                 **{k: v for k, v in options.items() if k in ('mean', 'std', 'strict')})
    carried = b1_error(original, b1, images)
    del b1
    model = bcosify(original, b=args.b, preserve_function=args.preserve_function, **options)
    seconds = time.perf_counter() - t0
    spread = logit_spread(model, size)
    eq13 = eq13_autograd(copy.deepcopy(model).double(), add_inverse(images[:2].double()))
    print(f'{name}: B-cosified in {seconds:.2f} s (both forms, with recalibration); B=1 form vs original: '
          f'{carried:.1e} relative; {"B=1 form" if args.preserve_function else f"B={args.b:g} form"}: float64 '
          f'Eq. 13 error {eq13:.1e}, logit spread {spread:.3g} on noise images')

    folder.claim(['config.json', 'model.safetensors'])
    options_text = ', '.join(f'{k}={v!r}' for k, v in dict(b=args.b, preserve_function=args.preserve_function,
                                                            **options).items())
    save_pretrained(model, str(folder.root), description=f'{name} B-cosified: timm_bcos.bcosify({options_text})',
                    fsync=True)
    print(f"saved: {folder.root}/model.safetensors + config.json; load: timm.create_model('local-dir:{folder.root}', "
          f'pretrained=True) after import timm_bcos; fine-tune: timm-bcos train --model local-dir:{folder.root} '
          f'--pretrained ...')
