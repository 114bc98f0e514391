"""`timm-bcos` command line: a thin layer over the library.

    timm-bcos explain IMAGE... --model NAME|local-dir:PATH|hf-hub:ID [--checkpoint FILE]
                     [--target C | --topk K] [--layer L --neuron N] --out DIR
    timm-bcos publish RUN_DIR --repo-id ORG/NAME [--private] [--dry-run --out DIR] [--image PNG ...] [--space]
    timm-bcos pull ORG/NAME --out DIR
    timm-bcos bcosify MODEL --out DIR [--checkpoint FILE] [--b B] [--preserve-function] [--option K=V ...]
    timm-bcos coverage [--models NAME ... | --families [FAMILY ...]] [--train] [--out FILE]  (see --help)
    timm-bcos train --model NAME --data digits|fashion-mnist|DIR --output DIR [options]  (see --help)
    timm-bcos evaluate --model NAME --baseline NAME --data fashion-mnist --grid 3 --n 500 --out DIR  (see --help)
    timm-bcos demo [--model NAME] [--out out/demo]
    timm-bcos serve [--model NAME_OR_PATH ...] [--host 127.0.0.1] [--port 7860]  (the explorer in the browser)
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ['main']


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-bcos', description='B-cos networks for timm',
                                     epilog='--debug (anywhere): show the traceback of an error')
    sub = parser.add_subparsers(dest='command', required=True)
    ex = sub.add_parser('explain', help='explain images: one PNG per image and results.json')
    ex.add_argument('images', nargs='+')
    ex.add_argument('--model', required=True, help='a timm name (import timm_bcos), local-dir:PATH or hf-hub:ID')
    ex.add_argument('--checkpoint', help='a safetensors file with the weights')
    ex.add_argument('--num-classes', type=int, help="the checkpoint's class count")
    what = ex.add_mutually_exclusive_group()
    what.add_argument('--target', type=int, help='class to explain (default: the prediction)')
    what.add_argument('--topk', type=int, help='explain the top-k classes')
    what.add_argument('--layer', help='explain a neuron of this module (with --neuron)')
    ex.add_argument('--neuron', type=int, help='channel of --layer to explain')
    ex.add_argument('--out', required=True, help='output folder: new, empty, or an earlier explain output')
    pub = sub.add_parser('publish', help='write a Hub repo folder (weights, config, model card) and upload it')
    pub.add_argument('run_dir', help='a folder with config.json + model.safetensors (e.g. a train run)')
    pub.add_argument('--repo-id', required=True)
    pub.add_argument('--private', action='store_true')
    pub.add_argument('--token', help='Hub token (default: HF_TOKEN or the saved `hf auth login`)')
    pub.add_argument('--dry-run', action='store_true', help='only write the folder')
    pub.add_argument('--out', help='where to write the folder: new, empty, or an earlier publish output (default: '
                                   'a new temporary folder)')
    pub.add_argument('--no-weights', action='store_true', help='card and config only (no model.safetensors)')
    pub.add_argument('--image', action='append', help="example image(s) for the card's explanation")
    pub.add_argument('--space', action='store_true', help='also write (and upload) a Hub Space serving the explorer '
                                                          'for this model (app.py, requirements.txt, README.md)')
    pub.add_argument('--space-out', help='where to write the Space folder (default: the --out folder + "-space")')
    pull = sub.add_parser('pull', help="download a published model's files")
    pull.add_argument('repo_id')
    pull.add_argument('--out', required=True)
    # these parse their own options (`timm-bcos train --help`)
    for name, text in (('bcosify', 'B-cosify a trained model (keeps its weights) and save it for fine-tuning'),
                       ('coverage', 'convert timm architectures (a list or one per family) and check Eq. 13, '
                                     'the logit spread and the gates, or --train them briefly (writes a report)'),
                       ('train', 'train with accelerate (checkpoints, --resume, final local-dir: folder)'),
                       ('evaluate', 'grid pointing game of B-cos vs post-hoc explanations (tables, plots)'),
                       ('demo', 'explain the shipped Fashion-MNIST model and check Eq. 13'),
                       ('serve', 'the explanation explorer in the browser (Gradio), offline on the shipped model')):
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Run a command. A user error (a missing or unreadable file, a folder the library will not write
    into, a bad value, missing weights, ...) prints one line and exits with status 1; ``--debug``
    (anywhere on the command line) shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv
    argv = [a for a in argv if a != '--debug']
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    from ..cpu_memory import keep_freed_cpu_memory

    keep_freed_cpu_memory()  # this process's tensors reuse freed memory (README, "CPU memory")
    try:
        _run(parser, args, rest)
    except Exception as e:  # one line for the user; the traceback with --debug
        if debug:
            raise
        print(f'timm-bcos {args.command}: error: {_one_line(e)} (--debug shows the traceback)', file=sys.stderr)
        raise SystemExit(1) from None


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: List[str]) -> None:
    if args.command in ('explain', 'publish', 'pull'):
        if rest:
            parser.error(f'unrecognized arguments: {" ".join(rest)}')
        {'explain': _explain, 'publish': _publish, 'pull': _pull}[args.command](args)
        return
    if args.command == 'coverage':
        from ..evaluation.coverage_cli import coverage_main as run
    elif args.command == 'bcosify':
        from .bcosify import main as run
    elif args.command == 'train':
        from ..training import main as run
    elif args.command == 'evaluate':
        from ..evaluation import main as run
    elif args.command == 'serve':
        from .serve import main as run
    else:
        from .demo import main as run
    run(rest)


def _one_line(e: BaseException) -> str:
    """The message of `e` on one line; its type too unless it is one of the errors meant for users."""
    text = ' '.join(str(e).split()) or type(e).__name__
    user_errors = (OSError, ValueError, RuntimeError, ImportError)  # files, values, weights, Hub, checkpoints
    return text if isinstance(e, user_errors) else f'{type(e).__name__}: {text}'


def _explain(args: argparse.Namespace) -> None:
    from ..explain import describe, explain_images
    from ..models import load_model

    if (args.layer is None) != (args.neuron is None):
        raise SystemExit('timm-bcos explain: --layer and --neuron go together')
    kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    model = load_model(args.model, args.checkpoint, **kwargs)
    results = explain_images(model, args.images, args.out, args.target, k=args.topk, layer=args.layer,
                             neuron=args.neuron)
    for r in results:
        print(describe(r))
    print(f'results: {args.out}/results.json')


def _publish(args: argparse.Namespace) -> None:
    from ..hub import publish

    where = publish(args.run_dir, args.repo_id, images=args.image, private=args.private, token=args.token,
                    dry_run=args.dry_run, out_dir=args.out, weights=not args.no_weights, space=args.space,
                    space_dir=args.space_out)
    for line, what in zip(where.splitlines(), ('model', 'space')):
        print(f'{"wrote" if args.dry_run else "published"} {what}: {line}')


def _pull(args: argparse.Namespace) -> None:
    from ..hub import pull

    print(pull(args.repo_id, args.out))

