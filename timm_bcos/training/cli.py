"""``timm-bcos train``: the command line of `train` (options, ``--config`` recipes, ``--model-kwargs``)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Dict, List, Optional, Union

from .._utils import parse_kwargs
from .checkpoint import METRICS_FILE, CheckpointError
from .config import BCOSIFY_RECIPE, LOSSES, PRECISIONS, SCHEDULES, TrainConfig
from .loop import train

__all__ = ['build_parser', 'main', 'parse_config']


def build_parser(prog: str = 'timm-bcos train') -> argparse.ArgumentParser:
    """The options of `main`: one per `TrainConfig` field, with its defaults."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog=prog, description='Train a timm model (B-cos or conventional) with accelerate. '
                                'Run under `accelerate launch` for several GPUs/nodes.')
    p.add_argument('--config', metavar='JSON', help='a recipe: TrainConfig fields as JSON (e.g. conversion/recipes/'
                   '*.json); other options override it')
    p.add_argument('--model', default=d.model, help=f'timm model name (default {d.model})')
    p.add_argument('--model-kwargs', nargs='+', default=[], metavar='KV',
                   help='model arguments: KEY=JSON ... or one JSON object, e.g. widths=[16,16,32,32,32,64,64,64]')
    p.add_argument('--pretrained', action='store_true', help="start from the model's pretrained weights")
    p.add_argument('--data', default=d.data, help="'digits', 'fashion-mnist' or an image folder (default digits)")
    p.add_argument('--num-classes', type=int, help="default: the dataset's")
    p.add_argument('--img-size', type=int, help="default: the model's pretrained_cfg input size")
    p.add_argument('--train-subset', type=int, help='train on a fixed random subset of N images')
    p.add_argument('--no-augment', dest='augment', action='store_false', help='no data augmentation')
    p.add_argument('--auto-augment', help="image folders: timm auto-augment string, e.g. 'rand-m9-mstd0.5'")
    p.add_argument('--num-workers', type=int, default=d.num_workers)
    p.add_argument('--bcosify', nargs='*', metavar='KV', help='B-cosify the (--pretrained) model first, with these '
                   'timm_bcos.bcosify options KEY=VALUE (JSON or a string), e.g. activations=remove std=[1,1,1]; '
                   "the defaults become B-cosification's fine-tuning recipe: " +
                   ', '.join(f'--{k.replace("_", "-")} {v}' for k, v in BCOSIFY_RECIPE.items()))
    p.add_argument('--b-warmup-epochs', type=float, default=d.b_warmup_epochs,
                   help='--bcosify: ramp B linearly from 1 to its target over these epochs')
    p.add_argument('--epochs', type=int, default=d.epochs)
    p.add_argument('--batch-size', type=int, default=d.batch_size, help='global batch (default 256)')
    p.add_argument('--lr', type=float, default=d.lr, help='lr at --lr-base-batch images per step (default 2.5e-4)')
    p.add_argument('--lr-base-batch', type=int, default=d.lr_base_batch,
                   help='lr scales with images per step / this (default 256; 0: no scaling)')
    p.add_argument('--weight-decay', type=float, default=d.weight_decay)
    p.add_argument('--schedule', choices=SCHEDULES, default=d.schedule)
    p.add_argument('--step-at', type=float, default=d.step_at, help='step schedule: fraction of training (0.6)')
    p.add_argument('--step-factor', type=float, default=d.step_factor)
    p.add_argument('--warmup-epochs', type=float, default=d.warmup_epochs)
    p.add_argument('--grad-clip', type=float, help='max gradient norm')
    p.add_argument('--mixed-precision', choices=PRECISIONS, default=d.mixed_precision)
    p.add_argument('--grad-accum', dest='gradient_accumulation_steps', type=int, default=d.gradient_accumulation_steps)
    p.add_argument('--loss', choices=LOSSES, default=d.loss)
    p.add_argument('--off-label', type=_parse_off_label, nargs='?', const=True, default=False,
                   help='BCE off-targets: 1/C (no value, B-cos v2) or the given value')
    p.add_argument('--seed', type=int, default=d.seed)
    p.add_argument('--output', help='output folder (required unless the recipe has one)')
    p.add_argument('--resume', action='store_true', help='continue from OUTPUT/checkpoint')
    p.add_argument('--overwrite', action='store_true', help='start afresh in a folder that holds a previous run')
    p.add_argument('--max-steps', type=int)
    p.add_argument('--cpu', action='store_true', default=None, help='use the CPU even when a GPU is present')
    p.add_argument('--no-progress', dest='progress', action='store_false')
    return p


def parse_config(argv: Optional[List[str]] = None) -> TrainConfig:
    """The `TrainConfig` of a ``timm-bcos train`` command line: a ``--config`` recipe's values below
    the options given; with ``--bcosify``, `BCOSIFY_RECIPE` below both."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        recipe = _read_recipe(args.config) if args.config else {}
        if args.bcosify is not None or recipe.get('bcosify') is not None:
            parser.set_defaults(**BCOSIFY_RECIPE)  # below the recipe's values and the options given
            args = parser.parse_args(argv)
        if recipe:  # the recipe's values become the defaults; options given on the command line win
            parser.set_defaults(**{k: v for k, v in recipe.items() if k not in ('model_kwargs', 'bcosify')})
            if recipe.get('bcosify') is not None:
                parser.set_defaults(bcosify=[])
            args = parser.parse_args(argv)
        kw = vars(args)
        kw.pop('config')
        if kw['lr_base_batch'] == 0:
            kw['lr_base_batch'] = None
        kw['model_kwargs'] = {**recipe.get('model_kwargs', {}), **parse_kwargs(kw['model_kwargs'], '--model-kwargs')}
        if kw['bcosify'] is not None:
            kw['bcosify'] = {**(recipe.get('bcosify') or {}), **parse_kwargs(kw['bcosify'], '--bcosify')}
        if not kw['output']:
            raise ValueError('--output is required')
        return TrainConfig(**kw)
    except (ValueError, argparse.ArgumentTypeError, OSError) as e:
        raise SystemExit(f'timm-bcos train: {e}')


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``timm-bcos train ...`` (also ``python -m timm_bcos.training ...``,
    ``accelerate launch -m timm_bcos.training ...``)."""
    config = parse_config(argv)
    try:
        results = train(config)
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f'timm-bcos train: {e}')
    from accelerate import PartialState
    if PartialState().is_main_process:
        print(f'test accuracy {results.get("test_acc", float("nan")):.4f} after {results["epochs_completed"]} '
              f'epoch(s); model: {config.output}/model.safetensors + config.json, '
              f'metrics: {config.output}/{METRICS_FILE}')
    return results


def _read_recipe(path: str) -> Dict[str, Any]:
    """TrainConfig fields from a JSON file (a recipe, or the ``config`` of a run's results.json)."""
    with open(path) as f:
        recipe = json.load(f)
    recipe = recipe.get('config', recipe) if isinstance(recipe, dict) else recipe
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(recipe, dict) or set(recipe) - known:
        raise ValueError(f'{path}: not a training recipe (unknown fields '
                         f'{sorted(set(recipe) - known) if isinstance(recipe, dict) else type(recipe).__name__})')
    return recipe


def _parse_off_label(value: str) -> Union[bool, float]:
    """``--off-label``'s value: ``true``/``yes``/``1/c`` (1/C, as without a value), ``false``/``no`` (0)
    or a number."""
    if value.lower() in ('true', 'yes', '1/c'):
        return True
    if value.lower() in ('false', 'no'):
        return False
    return float(value)
