"""Images per second on one CUDA device: training (bf16 autocast) and explain, `bcos_resnet50`
against timm's `resnet50`, eager and ``torch.compile``; one table, printed row by row.

Training: forward + backward + Adam step at batch 64, 224 px, bf16 autocast. Explain: the
B-cos model's `timm_bcos.explain` (1 target, batch 64, float32), against timm resnet50's no-grad
forward as the baseline row. Each number is the median of `--reps` timed runs of `--steps` steps
after `--warmup` steps (which also compile). ``--device cpu --batch 2 --size 64 --steps 1`` is a
smoke test of the script itself, not a measurement.

Time (an H200, 16 cores, 2026-12-04: `gpu.txt`): under 4 minutes with the B-cos layers compiled
as custom ops, plus the compiles of `bcos_resnet50`'s traced graphs that GPUs now get (training
156 s, explanation mode 44 s): give the run 10 minutes, or ``--no-compile`` for the eager table.

    python benchmarks/gpu.py [--batch 64] [--size 224] [--steps 20] [--reps 3] [--no-compile]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, Tuple

import timm
import torch

import timm_bcos


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _images_per_s(step: Callable[[], None], images: int, device: torch.device, args) -> float:
    for _ in range(args.warmup):
        step()
    rates = []
    for _ in range(args.reps):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        rates.append(images * args.steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--reps', type=int, default=3)
    parser.add_argument('--no-compile', action='store_true')
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('no CUDA device: this benchmark needs a GPU (--device cpu only smoke-tests the script)')
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    x3 = torch.rand(args.batch, 3, args.size, args.size, device=device)
    x6 = timm_bcos.add_inverse(x3)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    what = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (smoke test, not a measurement)'
    print(f'{what}, torch {torch.__version__}, timm {timm.__version__}, batch {args.batch}, {args.size} px, '
          f'median of {args.reps} x {args.steps} steps', flush=True)
    print('| model | workload | images/s | vs timm resnet50 (same workload kind and mode) |')
    print('|---|---|---:|---:|', flush=True)
    rows: Dict[Tuple[str, str], float] = {}

    def measure(name: str, kind: str, mode: str, step: Callable[[], None], baseline: str) -> None:
        # one row as soon as it is measured: a failing or killed later measurement keeps the earlier rows
        work = f'{kind}, {mode}'
        try:
            rows[(name, work)] = rate = _images_per_s(step, args.batch, device, args)
        except Exception as e:  # noqa: BLE001 - reported in the table, the other rows still run
            print(f'| {name} | {work} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} | |', flush=True)
            return
        base = rows.get(('resnet50', f'{baseline}, {mode}'))
        print(f'| {name} | {work} | {rate:.0f} | {f"{rate / base:.2f}" if base else "n/a"} |', flush=True)

    modes = ['eager'] + ([] if args.no_compile else ['compiled'])
    for mode in modes:
        for name, x in (('resnet50', x3), ('bcos_resnet50', x6)):
            model = timm.create_model(name, num_classes=1000).to(device).train()
            run = torch.compile(model, fullgraph=True) if mode == 'compiled' else model
            measure(name, 'train bf16', mode, _train_step(run, x, y, device), baseline='train bf16')
            run.eval()
            if name == 'resnet50':
                def forward(run=run, x=x) -> None:
                    with torch.no_grad():
                        run(x)
                measure(name, 'no-grad forward', mode, forward, baseline='no-grad forward')
            else:
                measure(name, 'explain (1 target)', mode, lambda run=run, x=x: timm_bcos.explain(run, x),
                        baseline='no-grad forward')
            del model, run
            if device.type == 'cuda':
                torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
