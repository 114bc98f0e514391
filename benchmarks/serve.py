"""Speed of the explorer (`timm-bcos serve`): start-up to a ready page, and the latency of one
explanation through its ``explain`` API against `timm_bcos.explain` of the same image in this process.

Starts ``timm-bcos serve`` (the shipped model) on a free port on 127.0.0.1, times until the page
answers, then sends each shipped image once (not cached: the top-5 classes are explained) and once
more (cached) through gradio_client, one request at a time. Prints medians and the ratio to a direct
`explain(model, x, k=5)` of one image (the work the server does for a new image).

    python benchmarks/serve.py [--model bcos_simple_cifar_tiny.fashion_mnist]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import torch

import timm_bcos
from timm_bcos.app.explorer import DEFAULT_MODEL
from timm_bcos.data import demo_images, load_images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f'timm-bcos serve exited with {proc.returncode}')
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f'{url} not ready after {timeout} s')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default=DEFAULT_MODEL)
    args = parser.parse_args()
    from gradio_client import Client, handle_file

    torch.set_flush_denormal(True)
    port = _free_port()
    url = f'http://127.0.0.1:{port}/'
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED='False')
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, '-m', 'timm_bcos.cli', 'serve', '--model', args.model, '--port',
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(url, proc)
        ready = time.perf_counter() - t0
        client = Client(url, verbose=False)
        images = demo_images()
        new, cached = [], []
        for times in (new, cached):
            for image in images:
                t = time.perf_counter()
                client.predict(handle_file(image), args.model, api_name='/explain')
                times.append(time.perf_counter() - t)
    finally:
        proc.terminate()
        proc.wait(10)
    model = timm_bcos.load_model(args.model)
    direct = []
    for image in images:
        t = time.perf_counter()
        timm_bcos.explain(model, load_images(model, [image]), k=5)
        direct.append(time.perf_counter() - t)
    d, n, c = (statistics.median(v) for v in (direct, new, cached))
    print(f'model {args.model}, {len(images)} shipped images, {torch.get_num_threads()} threads')
    print(f'timm-bcos serve to a ready page: {ready:.1f} s')
    print('| per image (median) | s | ratio to direct explain |')
    print('|---|---:|---:|')
    print(f'| direct `explain(k=5)` (load + transform + explain) | {d:.3f} | 1.00 |')
    print(f'| API `explain`, new image | {n:.3f} | {n / d:.1f} |')
    print(f'| API `explain`, cached image | {c:.3f} | {c / d:.1f} |')


if __name__ == '__main__':
    main()
