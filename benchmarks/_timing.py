"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, Tuple

import timm
import torch
from torch import Tensor, cat, nn

from timm_bcos import convert_to_bcos

# The variants a timm model is compared in: as timm builds it, and converted with MaxOut 2 and 1.
VARIANTS = ('timm', 'max_out=2', 'max_out=1')

# The ops that run convolutions on CPU (profiler names); everything else is the layers' own work.
_CONV_FORWARD = ('aten::mkldnn_convolution', 'aten::_slow_conv2d_forward', 'aten::thnn_conv2d',
                 'aten::_convolution_depthwise2d')
# ... and their backward: oneDNN's, and the GEMM + col2im input gradient of layers with few input channels
_CONV_BACKWARD = ('aten::convolution_backward', 'aten::_slow_conv2d_backward')


def build_variant(name: str, variant: str) -> Tuple[nn.Module, float]:
    """`variant` (one of `VARIANTS`) of timm's `name` (1000 classes) in train mode, and the seconds
    its conversion took."""
    model = timm.create_model(name, num_classes=1000)
    t0 = time.perf_counter()
    if variant != 'timm':
        model = convert_to_bcos(model, max_out=int(variant.split('=')[1]))
    return model.train(), time.perf_counter() - t0


def variant_input(variant: str, x: Tensor) -> Tensor:
    """An RGB batch as `variant` takes it: converted models take the 6-channel [x, 1-x] encoding."""
    return x if variant == 'timm' else cat([x, 1 - x], 1)


def median_time(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of `reps` calls of `fn`, after `warmup` calls."""
    return interleaved_medians({'fn': fn}, reps, warmup=warmup)['fn']


def interleaved_medians(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> Dict[str, float]:
    """Median seconds per call of each function, after `warmup` calls each (which also compile),
    run round-robin: a shared machine's slow spells hit every function alike, not one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def conv_split(fn) -> Dict[str, float]:
    """Self CPU ms of one call of `fn` (after a warm-up call), split into convolution forward,
    convolution backward and the rest: how much of a step the convolutions themselves take."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    split = {'conv forward': 0.0, 'conv backward': 0.0, 'rest': 0.0}
    for event in prof.key_averages():
        kind = ('conv backward' if event.key in _CONV_BACKWARD else
                'conv forward' if event.key in _CONV_FORWARD else 'rest')
        split[kind] += event.self_cpu_time_total / 1e3
    return split


def benchmark_parser(doc: str, **defaults) -> argparse.ArgumentParser:
    """A CPU benchmark's options: its description (the first line of `doc`), ``--threads`` (2 by
    default) and one option per keyword with its default: ``models`` takes names, the others a
    value of their default's type (``reps=7`` gives ``--reps N``)."""
    parser = argparse.ArgumentParser(description=doc.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    for name, default in defaults.items():
        if isinstance(default, list):
            parser.add_argument(f'--{name}', nargs='+', default=default)
        else:
            parser.add_argument(f'--{name}', type=type(default), default=default)
    return parser


def set_up(threads: int) -> None:
    """The state every CPU benchmark runs in: `threads` threads, denormals flushed (untrained B-cos
    nets make tiny activations, and denormal arithmetic is slow), seed 0."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
