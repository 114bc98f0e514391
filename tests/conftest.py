import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    yield


@pytest.fixture
def hub_offline(monkeypatch):
    """huggingface_hub's offline mode for one test: the variable, and the flag huggingface_hub read from it
    when imported (what timm_bcos and huggingface_hub consult)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
