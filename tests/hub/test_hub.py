"""Publishing to the Hub: the dry-run folder, the model card, and a real upload to a local test double."""
import os
import re

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image

import timm_bcos
from timm_bcos.cli import main as cli
from timm_bcos._utils import OWNER_FILE
from timm_bcos.hub import HubPublishError, publish

from hub_double import HubDouble

METRICS = dict(test_accuracy=0.912, dataset='fashion_mnist', recipe=dict(epochs=3, lr=1e-3))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return timm.create_model('bcos_simple_cifar_tiny', num_classes=10).eval()


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f'example{i}.png'))
        Image.fromarray((rng.random((28, 28, 3)) * 255).astype('uint8')).save(paths[-1])
    return paths


def _files(folder):
    """A published folder's files, without the hidden file marking it as publish's own (not uploaded)."""
    return sorted(f for f in os.listdir(folder) if f != OWNER_FILE)


def _same(a, b, x):
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    ea, eb = timm_bcos.explain(a, x, k=2), timm_bcos.explain(b, x, k=2)
    assert torch.equal(ea.weights, eb.weights) and torch.equal(ea.targets, eb.targets)


def test_dry_run_folder_loads_back(model, images, tmp_path):
    out = publish(model, 'testorg/bcos-tiny', metrics=METRICS, images=images, dry_run=True, out_dir=str(tmp_path / 'repo'))
    assert _files(out) == ['README.md', 'config.json', 'explanation.png', 'model.safetensors']
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    _same(model, loaded, timm_bcos.add_inverse(torch.rand(3, 3, 32, 32)))
    card = ModelCard.load(os.path.join(out, 'README.md'))
    data = card.data.to_dict()
    assert data['library_name'] == 'timm' and data['license'] == 'apache-2.0'
    assert {'image-classification', 'interpretability', 'b-cos'} <= set(data['tags'])
    assert data['datasets'] == ['fashion_mnist'] and data['metrics'] == ['accuracy']
    assert card.data.eval_results[0].metric_value == pytest.approx(0.912)
    text = card.text
    assert "timm.create_model('hf-hub:testorg/bcos-tiny', pretrained=True)" in text and 'import timm_bcos' in text
    assert 'explanation.png' in text and '@inproceedings{bohle2022bcos' in text
    assert '| test_accuracy | 0.912 |' in text and '| lr | 0.001 |' in text
    assert 'B = 2.0, MaxOut 2' in text
    error = float(re.search(r'\| eq13_error \| (\S+) \|', text).group(1))  # the card's explanation is exact
    assert 0 <= error < 1e-4


def test_run_folder_and_no_weights(model, images, tmp_path):
    timm.models.save_for_hf(model, str(tmp_path / 'run'), safe_serialization=True)
    (tmp_path / 'run' / 'results.json').write_text('{"test_accuracy": 0.9, "dataset": "digits"}')
    cli(['publish', str(tmp_path / 'run'), '--repo-id', 'testorg/x', '--dry-run', '--out', str(tmp_path / 'card'),
         '--no-weights', '--image', images[0]])
    assert _files(tmp_path / 'card') == ['README.md', 'config.json', 'explanation.png']
    assert ModelCard.load(str(tmp_path / 'card' / 'README.md')).data.datasets == ['digits']


def test_upload_and_load_back_through_the_hub_api(model, images, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    # make test runs with HF_HUB_OFFLINE=1; this test talks to its own local server only
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    with HubDouble(owner='testorg') as hub:
        url = publish(model, 'testorg/bcos-tiny', metrics=METRICS, images=images, token='hf_test',
                      endpoint=hub.url, out_dir=str(tmp_path / 'repo'))
        assert url.startswith(f'{hub.url}/testorg/bcos-tiny/commit/')
        assert set(hub.repos['testorg/bcos-tiny']['files']) == {'README.md', 'config.json', 'explanation.png',
                                                                 'model.safetensors'}
        monkeypatch.setattr(constants, 'ENDPOINT', hub.url)
        monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', hub.url + '/{repo_id}/resolve/{revision}/{filename}')
        loaded = timm.create_model('hf-hub:testorg/bcos-tiny', pretrained=True, cache_dir=str(tmp_path / 'cache'))
        _same(model, loaded.eval(), timm_bcos.add_inverse(torch.rand(2, 3, 32, 32)))
        with pytest.raises(HubPublishError, match='no write access to someoneelse/repo.*403'):
            publish(model, 'someoneelse/repo', images=images, token='hf_test', endpoint=hub.url,
                    out_dir=str(tmp_path / 'other'))


def test_clear_errors(model, images, tmp_path, monkeypatch):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(tmp_path / 'hf_home' / 'token'))
    monkeypatch.setattr(constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'hf_home' / 'stored_tokens'))
    with pytest.raises(HubPublishError, match='no Hugging Face token.*dry-run'):
        publish(model, 'testorg/x', images=images, out_dir=str(tmp_path / 'a'))
    with pytest.raises(HubPublishError, match='cannot reach the Hub.*--dry-run'):
        publish(model, 'testorg/x', images=images, token='hf_test', endpoint='http://127.0.0.1:9',
                out_dir=str(tmp_path / 'b'))
    with pytest.raises(FileNotFoundError, match='no config.json'):
        publish(str(tmp_path), 'testorg/x', dry_run=True)


# --- publish writes only into a folder of its own --------------------------------------------

def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('kind', ['unrelated files', 'a training run'])
def test_publish_never_deletes_a_folder_it_did_not_write(model, images, tmp_path, kind):
    out = tmp_path / 'out'
    (out / 'checkpoint').mkdir(parents=True)
    if kind == 'unrelated files':
        (out / 'notes.txt').write_text('mine')
    else:
        for name in ('results.json', 'metrics.jsonl', 'checkpoint/trainer_state.json'):
            (out / name).write_text('{}')
    before = _tree(out)
    with pytest.raises(timm_bcos.OutputFolderError, match='not written by timm-bcos'):
        publish(model, 'testorg/x', images=images, dry_run=True, out_dir=str(out))
    assert _tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ['example0.png', 'example1.png', 'out']  # no temporary folder left


def test_publish_out_dot_refused_by_the_cli(model, images, tmp_path, monkeypatch, capsys):
    timm.models.save_for_hf(model, str(tmp_path / 'run'), safe_serialization=True)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli(['publish', 'run', '--repo-id', 'testorg/x', '--dry-run', '--out', '.', '--image', images[0]])
    assert e.value.code != 0 and 'not written by timm-bcos' in capsys.readouterr().err
    assert _tree(tmp_path) == before


def test_publish_replaces_its_own_folder_but_not_a_file_put_into_it(model, images, tmp_path):
    out = tmp_path / 'card'
    publish(model, 'testorg/x', images=images, dry_run=True, out_dir=str(out), weights=False)
    (out / 'README.md').write_text('stale')
    publish(model, 'testorg/x', images=images, dry_run=True, out_dir=str(out), weights=False)
    assert 'B-cos network' in (out / 'README.md').read_text()  # replaced: it was publish's own
    (out / 'my_notes.md').write_text('mine')
    with pytest.raises(timm_bcos.OutputFolderError, match='my_notes.md'):
        publish(model, 'testorg/x', images=images, dry_run=True, out_dir=str(out), weights=False)
    assert (out / 'my_notes.md').read_text() == 'mine'


@pytest.mark.parametrize('repo_id', ['a/b/c', '../../etc', '', 'no-org', 'org/bad name'])
def test_bad_repo_id_is_refused_before_anything_is_written(model, tmp_path, repo_id):
    with pytest.raises(ValueError, match='repo_id must be ORG/NAME'):
        publish(model, repo_id, dry_run=True, out_dir=str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()


def test_cli_publish_takes_the_token(model, images, tmp_path, monkeypatch):
    """The README's `timm-bcos publish ... --token`: the token reaches the Hub."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))  # no saved login
    timm.models.save_for_hf(model, str(tmp_path / 'run'), safe_serialization=True)
    with HubDouble(owner='testorg') as hub:
        monkeypatch.setattr(constants, 'ENDPOINT', hub.url)
        cli(['publish', str(tmp_path / 'run'), '--repo-id', 'testorg/from-cli', '--token', 'hf_test', '--image',
             images[0], '--out', str(tmp_path / 'card')])
        assert 'README.md' in hub.repos['testorg/from-cli']['files']
