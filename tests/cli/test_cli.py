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


def test_coverage_replaces_only_a_coverage_report(tmp_path, capsys):
    notes = tmp_path / 'notes.md'
    notes.write_text('# my notes\n')
    with pytest.raises(SystemExit) as e:
        main(['coverage', '--models', 'resnet18', '--out', str(notes)])
    assert e.value.code == 1 and notes.read_text() == '# my notes\n'
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'is not a coverage report' in err and 'Traceback' not in err
    report = tmp_path / 'coverage.md'
    for _ in range(2):  # its own report is rewritten
        main(['coverage', '--models', 'resnet18', '--out', str(report)])
    assert report.read_text().startswith('# Conversion coverage')


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    args = ['explain', str(tmp_path / 'missing.png'), '--model', 'bcos_simple_cifar_tiny', '--out', str(tmp_path / 'o')]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count('\n') == 1 and 'missing.png' in err and err.startswith('timm-bcos explain:')
    with pytest.raises(FileNotFoundError):
        main(args + ['--debug'])
