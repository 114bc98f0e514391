"""benchmarks/gpu.py runs on a machine the CI never has: its CPU smoke mode keeps the script in step
with the library (model names, `explain`, the table it prints)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_prints_every_row():
    out = subprocess.run(
        [sys.executable, str(ROOT / 'benchmarks' / 'gpu.py'), '--device', 'cpu', '--batch', '2', '--size', '32',
         '--steps', '1', '--reps', '1', '--warmup', '1', '--no-compile'],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith('| ') and not line.startswith('| model')]
    assert [tuple(r.split(' | ')[:2]) for r in rows] == [
        ('| resnet50', 'train bf16, eager'), ('| resnet50', 'no-grad forward, eager'),
        ('| bcos_resnet50', 'train bf16, eager'), ('| bcos_resnet50', 'explain (1 target), eager')], out
    for row in rows:  # images/s and a ratio, no "failed"
        assert re.fullmatch(r'\| \S+ \| [^|]+ \| \d+ \| \d+\.\d\d \|', row), row
