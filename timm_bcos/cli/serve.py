"""`timm-bcos serve`: the explanation explorer in the browser (a Gradio app), offline on the shipped model.

    timm-bcos serve [--model NAME_OR_PATH ...] [--host 127.0.0.1] [--port 7860] [--topk 5]
"""
from __future__ import annotations

import argparse
import os
import time
from typing import List, Optional

from ..app.explorer import DEFAULT_MODEL


def main(argv: Optional[List[str]] = None) -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog='timm-bcos serve', description=__doc__.split('\n')[0])
    parser.add_argument('--model', nargs='+', default=[DEFAULT_MODEL],
                        help='models to offer: registered names, local-dir:PATH or hf-hub:ORG/NAME (the first is the '
                             f'default; default {DEFAULT_MODEL})')
    parser.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1: this machine only)')
    parser.add_argument('--port', type=int, default=7860)
    parser.add_argument('--topk', type=int, default=5, help='classes shown per image')
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error('--topk must be at least 1')
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # no calls home: the explorer works offline
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise ImportError('timm-bcos serve needs Gradio: pip install "timm-bcos[serve]"') from e
    from ..app.ui import serve

    serve(args.model, host=args.host, port=args.port, topk=args.topk, started=started)
