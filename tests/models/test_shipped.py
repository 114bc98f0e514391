"""The shipped default model: bcos_simple_cifar_tiny.fashion_mnist (weights and images in the package)."""
import copy
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


def _test_accuracy(model) -> float:
    """Accuracy on all 10,000 Fashion-MNIST test images at 32 px, as [x, 1-x]."""
    from timm_bcos.data import load_fashion_mnist

    _, _, x, y = load_fashion_mnist(32)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            xb = timm_bcos.AddInverse()(x[i:i + 1000].float().div(255).repeat(1, 3, 1, 1))
            correct += (model(xb).argmax(1) == y[i:i + 1000]).sum().item()
    return correct / len(y)


def test_shipped_model_reaches_90_percent_on_the_test_set(model, fashion_mnist):
    accuracy = _test_accuracy(model)
    assert accuracy >= 0.90
    metrics = json.loads((ROOT / 'hub_cards' / NAME / 'metrics.json').read_text())
    assert metrics['test_accuracy'] == pytest.approx(accuracy, abs=1e-4)  # the reported number is this one


def test_rendered_card_in_hub_cards_matches_the_shipped_model(model, tmp_path):
    _check_card(NAME, model, tmp_path)


def _check_card(name: str, model, tmp_path):
    """hub_cards/<name>/ is publish's dry run without weights: the card parses, its numbers are the
    measured ones, and its config.json builds the shipped architecture (weights from the package)."""
    from huggingface_hub import ModelCard

    folder = ROOT / 'hub_cards' / name
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
    return card


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


# --- the B-cosified tag: bcos_resnet18.fashion_mnist_bcosified ------------------------------------

BCOSIFIED = 'bcos_resnet18.fashion_mnist_bcosified'


@pytest.fixture(scope='module')
def bcosified():
    torch.set_flush_denormal(True)
    return timm.create_model(BCOSIFIED, pretrained=True).eval()


def test_bcosified_tag_ships_and_loads_offline(bcosified):
    """Its weights are in the package (float16); the tag builds B-cosified resnet18, the untagged name
    stays the paper's ImageNet design."""
    cfg = bcosified.pretrained_cfg
    path = Path(cfg['file'])
    assert path.parent == Path(timm_bcos.__file__).parent / 'assets' / 'weights' and path.stat().st_size < 25e6
    assert cfg['tag'] == 'fashion_mnist_bcosified' and cfg['input_size'] == (6, 32, 32) and bcosified.num_classes == 10
    assert bcosified.bcos_cfg['bcosified']['architecture'] == 'resnet18' and bcosified.bcos_cfg['b'] == 2.0
    plain = timm.create_model('bcos_resnet18')
    assert plain.num_classes == 1000 and 'bcosified' not in plain.bcos_cfg
    x = timm_bcos.add_inverse(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert timm_bcos.check_dynamic_linearity(copy.deepcopy(bcosified).double(), x.double()) < 1e-10


def test_bcosified_tag_accuracy_is_the_reported_one(bcosified, fashion_mnist):
    metrics = json.loads((ROOT / 'hub_cards' / BCOSIFIED / 'metrics.json').read_text())
    assert metrics['test_accuracy'] == pytest.approx(_test_accuracy(bcosified), abs=1e-4)
    assert metrics['test_accuracy'] >= metrics['from_scratch']['test_accuracy'] - 0.005
    assert 0.8 < metrics['conventional']['test_accuracy'] < 1


def test_bcosified_card_matches_the_shipped_model(bcosified, tmp_path):
    card = _check_card(BCOSIFIED, bcosified, tmp_path)
    assert 'B-cosified' in card.text and 'conventional_original_test_accuracy' in card.text
