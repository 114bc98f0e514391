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


def test_explain_command(tmp_path, capsys):
    import json

    import numpy as np
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    import timm_bcos  # noqa: F401  (registers the models)

    model = timm.create_model('bcos_simple_cifar_tiny', num_classes=10).double()
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        images.append(str(tmp_path / f'img{i}.png'))
        Image.fromarray((rng.random((28, 30, 3)) * 255).astype('uint8')).save(images[-1])
    main(['explain', *images, '--model', 'bcos_simple_cifar_tiny', '--checkpoint', str(tmp_path / 'w.safetensors'),
          '--num-classes', '10', '--topk', '3', '--out', str(tmp_path / 'out')])
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert [r['image'] for r in results] == images
    for r in results:
        assert len(r['targets']) == 3 and len(r['probabilities']) == 3
        assert r['targets'][0] == r['prediction']
        assert Image.open(r['png']).size[0] > 100
    assert 'results.json' in capsys.readouterr().out
    main(['explain', images[0], '--model', 'bcos_simple_cifar_tiny', '--checkpoint', str(tmp_path / 'w.safetensors'),
          '--num-classes', '10', '--layer', 'features.4', '--neuron', '3', '--out', str(tmp_path / 'layer')])
    assert json.loads((tmp_path / 'layer' / 'results.json').read_text())[0]['targets'] == [3]
    with pytest.raises(SystemExit):
        main(['explain', images[0], '--model', 'bcos_simple_cifar_tiny', '--layer', 'features.4', '--out', 'x'])
