"""The shipped default model: bcos_simple_cifar_tiny.fashion_mnist (weights and images in the package)."""
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch

import timm_bcos

NAME = 'bcos_simple_cifar_tiny.fashion_mnist'
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def model():
    torch.set_flush_denormal(True)
    return timm.create_model(NAME, pretrained=True).eval()  # offline: make test sets HF_HUB_OFFLINE=1


def test_weights_ship_in_the_package_and_load_offline(model):
    cfg = model.pretrained_cfg
    path = Path(cfg['file'])
    assert path.parent == Path(timm_bcos.__file__).parent / 'assets' / 'weights' and path.stat().st_size < 5e6
    assert cfg['tag'] == 'fashion_mnist' and cfg['input_size'] == (6, 32, 32) and len(cfg['label_names']) == 10
    assert timm.create_model('bcos_simple_cifar_tiny', pretrained=True).pretrained_cfg['tag'] == 'fashion_mnist'
    fresh = timm.create_model('bcos_simple_cifar_tiny')  # random init differs: the weights really loaded
    assert not torch.equal(fresh.classifier.weight, model.classifier.weight)


def test_shipped_images_are_explained_correctly(model):
    images = timm_bcos.data.demo_images()
    assert len(images) == 16
    x = timm_bcos.load_images(model, images)
    e = model.explain(x)
    assert e.check() < 1e-4
    names = [model.pretrained_cfg['label_names'][int(i)] for i in e.prediction]
    slug = [Path(p).stem.split('_', 1)[1] for p in images]
    correct = sum(n.lower().replace('/', '_').replace(' ', '_') == s for n, s in zip(names, slug))
    assert correct >= 14, list(zip(names, slug))


def test_shipped_model_reaches_90_percent_on_the_test_set(model, fashion_mnist):
    from timm_bcos.data import load_fashion_mnist

    _, _, x, y = load_fashion_mnist(32)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            xb = timm_bcos.AddInverse()(x[i:i + 1000].float().div(255).repeat(1, 3, 1, 1))
            correct += (model(xb).argmax(1) == y[i:i + 1000]).sum().item()
    accuracy = correct / len(y)
    assert accuracy >= 0.90
    metrics = json.loads((ROOT / 'hub_cards' / NAME / 'metrics.json').read_text())
    assert metrics['test_accuracy'] == pytest.approx(accuracy, abs=1e-4)  # the reported number is this one


def test_rendered_card_in_hub_cards_matches_the_shipped_model(model, tmp_path):
    """hub_cards/<name>/ is publish's dry run without weights: the card parses, its numbers are the
    measured ones, and its config.json builds the shipped architecture (weights from the package)."""
    from huggingface_hub import ModelCard

    folder = ROOT / 'hub_cards' / NAME
    assert not (folder / 'model.safetensors').exists()  # no second copy of the weights
    card = ModelCard.load(str(folder / 'README.md'))
    metrics = json.loads((folder / 'metrics.json').read_text())
    assert card.data.library_name == 'timm' and 'b-cos' in card.data.tags
    assert card.data.eval_results[0].metric_value == pytest.approx(metrics['test_accuracy'], abs=1e-4)
    shutil.copytree(folder, tmp_path / 'repo')
    shutil.copy(model.pretrained_cfg['file'], tmp_path / 'repo' / 'model.safetensors')
    loaded = timm.create_model(f'local-dir:{tmp_path / "repo"}', pretrained=True).eval()
    x = torch.rand(2, 6, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_shipped_card_explains_the_demo_images(model, tmp_path):
    """The card's explanation.png is the explanation of the first two demo images (not of anything
    else lying around when it was rendered: it once showed a box plot)."""
    import numpy as np
    from PIL import Image

    fresh = tmp_path / 'explanation.png'
    timm_bcos.explain(model, timm_bcos.load_images(model, timm_bcos.data.demo_images()[:2]), k=2).save(fresh)
    shipped = np.asarray(Image.open(ROOT / 'hub_cards' / NAME / 'explanation.png').convert('RGB'), dtype=float)
    ours = np.asarray(Image.open(fresh).convert('RGB'), dtype=float)
    assert shipped.shape == ours.shape and np.abs(shipped - ours).mean() < 2  # 0-255; a box plot differs by ~60
