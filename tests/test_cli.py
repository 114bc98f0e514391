"""The timm-bcos command line."""
import pytest

from timm_bcos.cli import main


def test_coverage_command_writes_report(tmp_path):
    out = tmp_path / 'coverage.md'
    main(['coverage', '--models', 'resnet18', 'selecsls42b', '--out', str(out)])
    text = out.read_text()
    assert '1/2 architectures convert' in text
    assert '| resnet18 |' in text and '| yes |' in text
    assert 'SelecSlsBlock' in text and 'torch.fx cannot trace' in text


def test_unknown_command():
    with pytest.raises(SystemExit):
        main(['frobnicate'])
