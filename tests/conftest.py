import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    yield


@pytest.fixture(autouse=True)
def _glibc_malloc_defaults(monkeypatch):
    """The command line keeps freed CPU memory process-wide and for good (`keep_freed_cpu_memory`):
    run in-process by a test, it would change the allocator for every later test. A no-op here;
    tests/test_cpu_memory.py checks the real one in fresh interpreters."""
    monkeypatch.setattr('timm_bcos.cpu_memory.keep_freed_cpu_memory', lambda: False)


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for a module of small models at small inputs (``pytestmark =
    pytest.mark.usefixtures('one_thread')``): on a shared 2-core machine two threads spin against
    each other, and small ops got up to ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_offline(monkeypatch):
    """huggingface_hub's offline mode for one test: the variable, and the flag huggingface_hub read from it
    when imported (what timm_bcos and huggingface_hub consult)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)


@pytest.fixture
def fashion_mnist():
    """The Fashion-MNIST folder (Debian's dataset-fashion-mnist). Missing: the test is skipped on a
    developer's machine, but fails in CI (``CI=true``), where .ci/run installs it."""
    from timm_bcos.data import FASHION_MNIST_DIR

    folder = Path(os.environ.get('TIMM_BCOS_FASHION_MNIST') or FASHION_MNIST_DIR)
    if not (folder / 't10k-labels-idx1-ubyte.gz').exists():
        message = f'Fashion-MNIST not installed ({folder}): apt-get install dataset-fashion-mnist'
        if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
            pytest.fail(message + ' (required in CI)')
        pytest.skip(message)
    return folder
