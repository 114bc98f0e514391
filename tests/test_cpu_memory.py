"""`keep_freed_cpu_memory`: freed large CPU tensors are reused instead of page-faulted in afresh.
Each check runs in a fresh interpreter: the setting is process-wide and cannot be undone."""
import subprocess
import sys

import pytest

# Allocates, fills and frees a 64 MB tensor 8 times and prints the fewest minor page faults of a
# round: with glibc's defaults the block is unmapped on every free and faulted in again (16k 4 KiB
# pages) in every round. Kept, most rounds reuse it (now and then a small object takes a piece of
# the freed block and the heap grows once more).
_PROBE = '''
import resource, sys, torch
import timm_bcos
applied = timm_bcos.keep_freed_cpu_memory() if sys.argv[1] == 'keep' else None
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults))
'''


def _faults(mode: str):
    out = subprocess.run([sys.executable, '-c', _PROBE, mode], capture_output=True, text=True, timeout=300,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')
def test_freed_memory_is_reused_without_page_faults():
    applied, kept = _faults('keep')
    _, default = _faults('default')
    assert applied == 'True'
    assert default > 8000 and kept < 500, (default, kept)


def test_the_command_line_keeps_freed_memory(monkeypatch, tmp_path):
    from timm_bcos import cpu_memory
    from timm_bcos.cli import main

    calls = []
    monkeypatch.setattr(cpu_memory, 'keep_freed_cpu_memory', lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        main(['explain', str(tmp_path / 'missing.png'), '--model', 'bcos_no_such_model', '--out', str(tmp_path / 'o')])
    assert calls == [1]
