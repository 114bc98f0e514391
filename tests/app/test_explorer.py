"""The explorer's model side and the Space folder: what the page shows equals `explain` directly."""
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import timm_bcos
from timm_bcos.app import Explorer, ExplorerError
from timm_bcos.app.explorer import heatmap, on_black, upscale
from timm_bcos.data import demo_images, load_images
from timm_bcos.hub import publish

from hub_double import HubDouble

MODEL = 'bcos_simple_cifar_tiny.fashion_mnist'


@pytest.fixture(scope='module')
def explorer():
    return Explorer([MODEL], topk=3)


def test_top_classes_and_class_view_equal_explain(explorer):
    images = demo_images()[:3]
    model = timm_bcos.load_model(MODEL)
    direct = timm_bcos.explain(model, load_images(model, images), k=3)
    tops = explorer.top_classes(MODEL, images)
    for i, top in enumerate(tops):
        assert torch.equal(top.targets[0], direct.targets[i])
        torch.testing.assert_close(top.probabilities[0], direct.probabilities[i])
        view = explorer.class_view(MODEL, images[i])  # the top class, from the cache
        assert view.colour.shape == (224, 224, 3) and view.colour.dtype == np.uint8
        np.testing.assert_array_equal(view.colour[::7, ::7], on_black(direct.to_rgba(i, 0)))
        np.testing.assert_array_equal(view.contributions[::7, ::7], heatmap(direct.contributions[i, 0]))
        assert view.eq13_error < 1e-5 and view.value == pytest.approx(direct.logits[i, 0].item(), rel=1e-5)
        assert view.colour.max() > 0  # not blank


def test_cache_and_other_classes(explorer, monkeypatch):
    image = demo_images()[0]
    explorer.top_classes(MODEL, [image])
    calls = []
    real = timm_bcos.app.explorer.explain
    monkeypatch.setattr(timm_bcos.app.explorer, 'explain', lambda *a, **k: calls.append(k) or real(*a, **k))
    top = explorer.top_classes(MODEL, [Image.open(image)])[0]  # the same picture as a PIL image: cached
    assert calls == []
    outside = next(c for c in range(10) if c not in top.targets[0].tolist())
    view = explorer.class_view(MODEL, image, outside)
    explorer.class_view(MODEL, image, outside)
    assert len(calls) == 1  # computed once, then cached
    direct = timm_bcos.explain(explorer.model(MODEL), top.inputs, outside)
    np.testing.assert_array_equal(view.contributions, upscale(heatmap(direct.contributions[0, 0])))
    assert explorer.class_names(MODEL)[outside] in view.title


def test_neuron_and_posthoc_views(explorer):
    image = demo_images()[1]
    layers = explorer.layers(MODEL)
    assert list(layers) == [f['module'] for f in explorer.model(MODEL).feature_info]
    layer = list(layers)[1]
    view = explorer.neuron_view(MODEL, image, layer, 3)
    direct = timm_bcos.explain(explorer.model(MODEL), load_images(explorer.model(MODEL), [image]), layer=layer,
                               neuron=3)
    np.testing.assert_array_equal(view.contributions, upscale(heatmap(direct.contributions[0, 0])))
    assert view.eq13_error < 1e-5
    post = explorer.posthoc_view(MODEL, image, 'gradcam')
    assert post.colour.shape == (224, 224, 3) and post.colour.std() > 0


def test_bad_input_gets_a_clear_message(explorer, tmp_path):
    bad = tmp_path / 'notes.png'
    bad.write_text('not an image')
    with pytest.raises(ExplorerError, match='cannot read notes.png'):
        explorer.top_classes(MODEL, [str(bad)])
    with pytest.raises(ExplorerError, match='no image'):
        explorer.class_view(MODEL, None)
    with pytest.raises(ExplorerError, match='not served here'):
        explorer.model('bcos_resnet50')
    with pytest.raises(ExplorerError, match='channel 999 out of range'):
        explorer.neuron_view(MODEL, demo_images()[0], list(explorer.layers(MODEL))[0], 999)
    with pytest.raises(ExplorerError, match='not one of the explained layers'):
        explorer.neuron_view(MODEL, demo_images()[0], 'nope', 0)
    with pytest.raises(ExplorerError, match='unknown post-hoc method'):
        explorer.posthoc_view(MODEL, demo_images()[0], 'lime')


def test_large_upload_is_resized_as_the_model_transform_does(explorer, tmp_path):
    big = tmp_path / 'big.png'
    Image.open(demo_images()[2]).convert('RGB').resize((300, 300), Image.BILINEAR).save(big)
    x = explorer.prepare(MODEL, [str(big)])
    assert x.shape == (1, 6, 32, 32)
    assert torch.equal(x, load_images(explorer.model(MODEL), [str(big)]))


def test_publish_writes_a_space_folder(tmp_path):
    model = timm.create_model('bcos_simple_cifar_tiny', num_classes=10).eval()
    out = publish(model, 'testorg/bcos-tiny', dry_run=True, out_dir=str(tmp_path / 'repo'), space=True, images=[])
    repo, space = out.splitlines()
    assert space == str(tmp_path / 'repo-space')
    assert sorted(f for f in os.listdir(space) if not f.startswith('.')) == ['README.md', 'app.py', 'requirements.txt']
    readme = (tmp_path / 'repo-space' / 'README.md').read_text()
    assert 'sdk: gradio' in readme and 'app_file: app.py' in readme and '- testorg/bcos-tiny' in readme
    assert "MODEL = 'hf-hub:testorg/bcos-tiny'" in (tmp_path / 'repo-space' / 'app.py').read_text()
    assert f'timm-bcos=={timm_bcos.__version__}' in (tmp_path / 'repo-space' / 'requirements.txt').read_text()
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'x.txt').write_text('a user file')
    with pytest.raises(timm_bcos.OutputFolderError, match='not written by timm-bcos'):
        publish(model, 'testorg/bcos-tiny', dry_run=True, out_dir=str(tmp_path / 'repo2'), space=True, images=[],
                space_dir=str(tmp_path / 'mine'))
    assert not (tmp_path / 'repo2').exists()  # refused before anything is written
    assert (tmp_path / 'mine' / 'x.txt').read_text() == 'a user file'


def test_publish_uploads_the_space(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    model = timm.create_model('bcos_simple_cifar_tiny', num_classes=10).eval()
    with HubDouble(owner='testorg') as hub:
        urls = publish(model, 'testorg/bcos-tiny', token='hf_test', endpoint=hub.url, out_dir=str(tmp_path / 'r'),
                       space=True, images=[]).splitlines()
        assert urls[0].startswith(f'{hub.url}/testorg/bcos-tiny/commit/')
        assert urls[1].startswith(f'{hub.url}/spaces/testorg/bcos-tiny/commit/')
        assert hub.repos['spaces/testorg/bcos-tiny']['sdk'] == 'gradio'
        assert set(hub.repos['spaces/testorg/bcos-tiny']['files']) == {'README.md', 'app.py', 'requirements.txt'}


def test_cli_publish_space_dry_run(tmp_path, capsys):
    from timm_bcos.cli import main as cli

    timm.models.save_for_hf(timm.create_model('bcos_simple_cifar_tiny', num_classes=10), str(tmp_path / 'run'),
                            safe_serialization=True)
    cli(['publish', str(tmp_path / 'run'), '--repo-id', 'testorg/x', '--dry-run', '--out', str(tmp_path / 'card'),
         '--no-weights', '--space', '--space-out', str(tmp_path / 'space')])
    out = capsys.readouterr().out
    assert f'wrote model: {tmp_path / "card"}' in out and f'wrote space: {tmp_path / "space"}' in out
    assert (tmp_path / 'space' / 'app.py').is_file()
