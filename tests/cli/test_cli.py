"""The timm-bcos command line."""
import pytest

from timm_bcos.cli import main


def test_coverage_command_writes_report(tmp_path):
    out = tmp_path / 'coverage.md'
    main(['coverage', '--models', 'test_resnet', 'test_vit', '--out', str(out)])
    text = out.read_text()
    assert '(no dot-product attention)** (models: 1): exact 1. Exact (Eq. 13 error <= 1e-06): 1/1 (100%)' in text
    assert '| resnet | test_resnet | ' in text and '| vision_transformer | test_vit | ' in text
    assert '## Attention / transformer models' in text and 'scaled_dot_product_attention in blocks.0.attn' in text


def test_coverage_refuses_unknown_models(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(['coverage', '--models', 'resnet18', 'no_such_net', '--out', str(tmp_path / 'c.md')])
    assert e.value.code == 1 and 'not timm models: no_such_net' in capsys.readouterr().err
    assert not (tmp_path / 'c.md').exists()


def test_coverage_train_command_writes_report(tmp_path):
    out = tmp_path / 'train.md'
    main(['coverage', '--train', '--models', 'test_resnet', '--steps', '2', '--batch-size', '8', '--out', str(out)])
    text = out.read_text()
    assert text.startswith('# Trainability') and '2 steps of batch 8' in text
    assert '| test_resnet |' in text and '| 32 | trained |' in text
    coverage = tmp_path / 'coverage.md'
    coverage.write_text('# Conversion coverage\n')
    with pytest.raises(SystemExit):  # a coverage report is not replaced by a trainability report
        main(['coverage', '--train', '--models', 'test_resnet', '--out', str(coverage)])
    assert coverage.read_text() == '# Conversion coverage\n'


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
        main(['coverage', '--models', 'test_resnet', '--out', str(notes)])
    assert e.value.code == 1 and notes.read_text() == '# my notes\n'
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'is not a coverage report' in err and 'Traceback' not in err
    report = tmp_path / 'coverage.md'
    for _ in range(2):  # its own report is rewritten
        main(['coverage', '--models', 'test_resnet', '--out', str(report)])
    assert report.read_text().startswith('# Conversion coverage')


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    args = ['explain', str(tmp_path / 'missing.png'), '--model', 'bcos_simple_cifar_tiny', '--out', str(tmp_path / 'o')]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count('\n') == 1 and 'missing.png' in err and err.startswith('timm-bcos explain:')
    with pytest.raises(FileNotFoundError):
        main(args + ['--debug'])


def test_bcosify_command(tmp_path, capsys, hub_offline):
    """A conventional model saved in timm's format is B-cosified, checked, saved and loads back;
    a folder with the user's files, a name without weights and missing offline weights are refused."""
    import timm
    import torch

    from timm_bcos import add_inverse

    source = tmp_path / 'conventional'
    timm.models.save_for_hf(timm.create_model('resnet18', num_classes=4), str(source), safe_serialization=True)
    out = tmp_path / 'bcosified'
    main(['bcosify', f'local-dir:{source}', '--out', str(out), '--option', 'activations=remove'])
    text = capsys.readouterr().out
    assert 'B=1 form vs original: ' in text and 'float64 Eq. 13 error ' in text and f'local-dir:{out}' in text
    b1_error = float(text.split('B=1 form vs original: ')[1].split()[0])
    eq13 = float(text.split('Eq. 13 error ')[1].split(',')[0])
    assert b1_error < 1e-4 and eq13 < 1e-10
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert model.bcos_cfg['bcosified']['activations'] == 'remove' and model.num_classes == 4
    assert model.check_dynamic_linearity(add_inverse(torch.rand(2, 3, 64, 64))) < 1e-4
    # a weights file for a timm architecture (pretrained_cfg_overlay=dict(file=...)), B=1 form
    main(['bcosify', 'resnet18', '--checkpoint', str(source / 'model.safetensors'), '--num-classes', '4',
          '--b', '1', '--preserve-function', '--out', str(tmp_path / 'b1')])
    assert 'B=1 form: float64 Eq. 13 error' in capsys.readouterr().out
    b1 = timm.create_model(f'local-dir:{tmp_path / "b1"}', pretrained=True).eval()
    original = timm.create_model(f'local-dir:{source}', pretrained=True).eval()
    x = torch.rand(2, 3, 64, 64)
    mean, std = (torch.tensor(original.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    with torch.no_grad():
        assert torch.allclose(b1(add_inverse(x)), original((x - mean) / std), rtol=1e-4, atol=1e-5)

    foreign = tmp_path / 'mine'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('mine')
    for argv, message in (([f'local-dir:{source}', '--out', str(foreign)], 'not written by timm-bcos'),
                          (['resnet18', '--out', str(tmp_path / 'a'), '--pretrained-file'], 'unrecognized'),
                          (['resnet50t', '--out', str(tmp_path / 'a')], 'has no pretrained weights'),
                          (['resnet18.a1_in1k', '--out', str(tmp_path / 'a')], 'are not available')):
        with pytest.raises(SystemExit):
            main(['bcosify'] + argv)
        assert message in capsys.readouterr().err
    assert (foreign / 'notes.txt').read_text() == 'mine' and sorted(p.name for p in foreign.iterdir()) == ['notes.txt']
