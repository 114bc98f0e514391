"""timm registry: names, pretrained_cfg, transforms, and every offline loading path with its errors."""
import hashlib
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import timm_bcos
from timm_bcos import CheckpointMismatchError, PretrainedWeightsError

V2_NAMES = ['bcosv2_resnet18', 'bcosv2_resnet34', 'bcosv2_resnet50', 'bcosv2_resnet101', 'bcosv2_resnet152',
            'bcosv2_resnext50_32x4d', 'bcosv2_densenet121', 'bcosv2_densenet161', 'bcosv2_densenet169',
            'bcosv2_densenet201', 'bcosv2_vgg11_bnu']
PAPER_NAMES = ['bcos_vgg11', 'bcos_resnet18', 'bcos_resnet34', 'bcos_resnet50', 'bcos_resnext50_32x4d',
               'bcos_densenet121', 'bcos_densenet161', 'bcos_inception_v3', 'bcos_efficientnet_b0',
               'bcos_mobilenetv3_large_100', 'bcos_convnext_tiny', 'bcos_simple_cifar', 'bcos_simple_cifar_plain']


@pytest.fixture(autouse=True)
def offline(hub_offline):
    """Every test here runs offline."""


def _x(size=32, n=2):
    return timm_bcos.AddInverse()(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)))


def test_names_are_listed():
    names = timm.list_models('bcos_*')
    assert set(PAPER_NAMES) <= set(names)
    assert set(timm.list_models('bcosv2_*')) == set(V2_NAMES)
    assert set(timm.list_pretrained('bcosv2_*')) == {f'{n}.in1k' for n in V2_NAMES}
    assert set(PAPER_NAMES) <= set(timm.list_models(module='bcos_models'))


@pytest.mark.parametrize('name', ['bcos_resnet18', 'bcos_densenet121', 'bcos_simple_cifar', 'bcos_simple_cifar_plain',
                                  'bcos_simple_cifar_tiny', 'bcosv2_resnet18'])
def test_create_and_cfg(name):
    model = timm.create_model(name, num_classes=5)
    cfg = model.pretrained_cfg
    assert cfg['architecture'] == name and cfg['input_size'][0] == 6
    assert cfg['mean'] == (0.0,) and cfg['std'] == (1.0,)
    assert cfg['paper_ids'] in ('arXiv:2205.10268', 'arXiv:2306.10898') and cfg['license']
    assert model.get_submodule(cfg['first_conv']).in_channels == 6
    assert cfg['classifier'].startswith(next(n for n, m in model.named_modules() if m is model.get_classifier()))
    assert model(_x()).shape == (2, 5)
    assert model.double().check_dynamic_linearity(_x().double()) < 1e-10


def test_design_and_overrides():
    model = timm.create_model('bcos_resnet18', num_classes=4)
    convs = [m for m in model.modules() if isinstance(m, timm_bcos.BcosConv2d)]
    assert all(c.b == 2 and c.max_out == 2 for c in convs)
    assert timm_bcos.unconverted_modules(model) == []
    model = timm.create_model('bcos_resnet18', num_classes=4, b=2.5, max_out=1)
    assert all(c.b == 2.5 and c.max_out == 1 for c in model.modules() if isinstance(c, timm_bcos.BcosConv2d))
    plain = timm.create_model('bcos_simple_cifar_plain')
    assert all(c.max_out == 1 for c in plain.modules() if isinstance(c, timm_bcos.BcosConv2d))


def test_create_transform_feeds_the_model():
    model = timm.create_model('bcos_simple_cifar')
    image = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype('uint8'))
    x = timm_bcos.create_transform(model)(image)
    assert x.shape == (6, 32, 32) and torch.allclose(x[:3] + x[3:], torch.ones(3, 32, 32))
    assert model(x[None]).shape == (1, 10)
    # timm's own config + transform, followed by AddInverse, works too
    config = timm.data.resolve_data_config({}, model=model)
    x3 = timm.data.create_transform(**config)(image)
    assert torch.equal(timm_bcos.AddInverse(dim=0)(x3), x)


def _save_model(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_file_overlay(tmp_path):
    model = timm.create_model('bcos_resnet18', num_classes=10).eval()
    _save_model(model, tmp_path / 'w.safetensors')
    loaded = timm.create_model('bcos_resnet18', num_classes=10, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.safetensors'))).eval()
    x = _x()
    assert torch.equal(loaded(x), model(x))


def test_local_dir(tmp_path):
    model = timm.create_model('bcos_simple_cifar', num_classes=7).eval()
    timm.models.save_for_hf(model, str(tmp_path / 'run'), safe_serialization=True)
    assert sorted(os.listdir(tmp_path / 'run')) == ['config.json', 'model.safetensors']
    loaded = timm.create_model(f'local-dir:{tmp_path / "run"}', pretrained=True).eval()
    assert type(loaded).__name__ == 'BcosSimpleNet' and loaded.num_classes == 7
    x = _x()
    assert torch.equal(loaded(x), model(x))


def _fill_hub_cache(cache, repo_id, folder):
    """Write the Hugging Face cache layout: refs/main -> commit, snapshots/<commit>/ -> blobs."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    (repo / 'blobs').mkdir()
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    for name in os.listdir(folder):
        data = (folder / name).read_bytes()
        blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)


def test_hf_hub_from_cache(tmp_path):
    model = timm.create_model('bcos_resnet18', num_classes=3).eval()
    timm.models.save_for_hf(model, str(tmp_path / 'run'), safe_serialization=True)
    _fill_hub_cache(tmp_path / 'cache', 'testorg/bcos-resnet18', tmp_path / 'run')
    loaded = timm.create_model('hf-hub:testorg/bcos-resnet18', pretrained=True, cache_dir=str(tmp_path / 'cache'))
    loaded.eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = _x()
    assert torch.equal(loaded(x), model(x))


def test_unknown_name_lists_close_matches():
    with pytest.raises(RuntimeError, match=r"Unknown model \(bcos_resnet19\).*bcos_resnet18"):
        timm_bcos.models.create_model('bcos_resnet19')
    assert type(timm_bcos.models.create_model('bcos_simple_cifar')).__name__ == 'BcosSimpleNet'


def test_weights_missing_offline(tmp_path):
    url = 'https://example.invalid/weights/bcos_resnet18.safetensors'
    with pytest.raises(PretrainedWeightsError, match=r'url=https://example.invalid.*HF_HUB_OFFLINE=1.*file=PATH'):
        timm.create_model('bcos_resnet18', pretrained=True, pretrained_cfg_overlay=dict(url=url),
                          cache_dir=str(tmp_path))
    with pytest.raises(PretrainedWeightsError, match=r'hf_hub_id=testorg/missing.*HF_HUB_OFFLINE'):
        timm.create_model('bcos_resnet18', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='testorg/missing'),
                          cache_dir=str(tmp_path))
    with pytest.raises(PretrainedWeightsError, match='No pretrained weights'):
        timm.create_model('bcos_resnet18', pretrained=True)
    # a registered tag: B-cos v2's released weights, not cached here
    with pytest.raises(PretrainedWeightsError, match=r'url=https://github.com/B-cos/B-cos-v2/releases/.*resnet_18'):
        timm.create_model('bcosv2_resnet18', pretrained=True, cache_dir=str(tmp_path))


def test_checkpoint_of_another_architecture(tmp_path):
    _save_model(timm.create_model('bcos_resnet34', num_classes=10), tmp_path / 'r34.safetensors')
    with pytest.raises(CheckpointMismatchError, match=r'unexpected keys.*layer1\.2\.conv1\.weight'):
        timm.create_model('bcos_resnet18', num_classes=10, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'r34.safetensors')))


def test_v2_checkpoint_of_another_architecture(tmp_path):
    from timm_bcos.weights import V2StateDictError
    import bcos.models.pretrained as v2
    torch.save(v2.resnet34(pretrained=False).state_dict(), tmp_path / 'resnet_34.pth')
    with pytest.raises(V2StateDictError, match='resnet34') as info:
        timm.create_model('bcosv2_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'resnet_34.pth')))
    assert isinstance(info.value, CheckpointMismatchError)


def test_checkpoint_of_another_class_count(tmp_path):
    _save_model(timm.create_model('bcos_resnet18', num_classes=10), tmp_path / 'w.safetensors')
    with pytest.raises(CheckpointMismatchError, match=r'fc\.weight: checkpoint \(20, 512\) vs model \(2000, 512\).*'
                                                      r'10 classes: pass num_classes=10'):
        timm.create_model('bcos_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.safetensors')))
    # fine-tuning: a different num_classes than the checkpoint's pretrained_cfg drops the head on purpose
    model = timm.create_model('bcos_resnet18', num_classes=3, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.safetensors'), num_classes=10))
    assert model.get_classifier().out_features == 3


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / 'broken.safetensors'
    path.write_bytes(b'\x00' * 64 + b'not a safetensors file')
    with pytest.raises(PretrainedWeightsError, match='corrupt'):
        timm.create_model('bcos_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_load_model_uses_the_default_tags_weights():
    from timm_bcos.models import load_model

    with pytest.warns(UserWarning, match='no pretrained weights'):
        model = load_model('bcos_simple_cifar')  # its v1 tags have weights, its default has none
    assert model.pretrained_cfg.get('tag') in (None, '') and not model.training
    shipped = load_model('bcos_simple_cifar_tiny')  # default tag .fashion_mnist: the shipped file
    assert shipped.pretrained_cfg['tag'] == 'fashion_mnist'
    with pytest.raises(RuntimeError, match='close B-cos names'):
        load_model('bcos_resnet19')


# --- loading errors name what is wrong --------------------------------------------------------

def test_hub_repo_missing_offline_is_named(tmp_path, monkeypatch):
    from timm_bcos.models import load_model

    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    with pytest.raises(PretrainedWeightsError, match=r'cannot load testorg/not-cached from the Hugging Face Hub '
                                                     r'\(HF_HUB_OFFLINE=1 is set and it is not in the local Hub cache'):
        load_model('hf-hub:testorg/not-cached')


def test_local_dir_without_a_readable_config_is_named(tmp_path):
    from timm_bcos.models import load_model

    with pytest.raises(PretrainedWeightsError, match=r'empty/config.json: not found'):
        load_model(f'local-dir:{tmp_path / "empty"}')
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'config.json').write_text('{"architecture": "bcos_simple_cifar_tiny",')
    with pytest.raises(PretrainedWeightsError, match=r'bad/config.json: not a readable JSON config'):
        load_model(f'local-dir:{tmp_path / "bad"}')


def test_missing_weights_file_says_file_not_found(tmp_path):
    path = tmp_path / 'nowhere.safetensors'
    with pytest.raises(PretrainedWeightsError) as e:
        timm.create_model('bcos_simple_cifar_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert str(e.value) == f'file not found: {path} (the weights of bcos_simple_cifar_tiny)'


def test_mismatch_names_the_checkpoints_class_count_and_maxout(tmp_path):
    from timm_bcos.models import load_model

    plain = timm.create_model('bcos_simple_cifar_tiny', max_out=1)  # 10 classes, MaxOut 1: classifier rows = 10
    _save_model(plain, tmp_path / 'plain.safetensors')
    with pytest.raises(CheckpointMismatchError) as e:
        load_model('bcos_simple_cifar_tiny', str(tmp_path / 'plain.safetensors'))
    assert "MaxOut 1, the model's 2: build it with max_out=1" in str(e.value) and 'pass num_classes' not in str(e.value)
    five = timm.create_model('bcos_simple_cifar_tiny', num_classes=5)
    _save_model(five, tmp_path / 'five.safetensors')
    with pytest.raises(CheckpointMismatchError, match=r'has 5 classes: pass num_classes=5'):
        load_model('bcos_simple_cifar_tiny', str(tmp_path / 'five.safetensors'))


def test_load_model_with_a_checkpoint_uses_the_names_class_count(tmp_path):
    from timm_bcos.models import load_model

    model = timm.create_model('bcos_simple_cifar_tiny')  # the registered default: 10 classes
    _save_model(model, tmp_path / 'w.safetensors')
    loaded = load_model('bcos_simple_cifar_tiny', str(tmp_path / 'w.safetensors'))  # was built for 1000 classes
    assert loaded.num_classes == 10
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


# --- timm's model API on every registered name ------------------------------------------------

ALL_NAMES = sorted(timm.list_models('bcos*') + timm.list_models('baseline*'))
HEAVY_NAMES = {'bcos_vgg11', 'bcosv2_vgg11_bnu', 'bcos_densenet161', 'bcosv2_densenet161', 'bcosv2_densenet201',
               'bcosv2_resnet152'}


def _images(name, size=96):
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return x if name.startswith('baseline') else timm_bcos.add_inverse(x)


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY_NAMES else n
                                  for n in ALL_NAMES])
def test_features_only_on_every_registered_name(name):
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        features = model(_images(name))
    info = model.feature_info
    assert [f.shape[1] for f in features] == info.channels() and len(features) >= 3
    assert [96 // f.shape[-1] for f in features] == [max(1, r) for r in info.reduction()] or 'inception' in name
    last = timm.create_model(name, features_only=True, out_indices=(len(info) - 1,)).eval()
    with torch.no_grad():
        assert [f.shape for f in last(_images(name))] == [features[-1].shape]


@pytest.mark.parametrize('name', ['bcos_simple_cifar_tiny', 'baseline_simple_cifar_tiny'])
def test_simple_nets_have_timms_model_api(name):
    from timm.optim import param_groups_layer_decay

    torch.manual_seed(0)
    model = timm.create_model(name).train()
    x = _images(name, 32)
    final, intermediates = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x)) and len(intermediates) == len(model.feature_info)
    assert [t.shape[1] for t in intermediates] == [f['num_chs'] for f in model.feature_info]
    assert len(model.forward_intermediates(x, indices=1, intermediates_only=True)) == 1
    groups = param_groups_layer_decay(model, layer_decay=0.5)
    assert len({g['lr_scale'] for g in groups}) > 2  # the layers got their own lr scales from group_matcher
    outputs = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        outputs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(outputs[0][0], outputs[1][0]) and all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(outputs[0][1], outputs[1][1]))


# timm's own VGG and Inception-v3 have no gradient checkpointing either
NO_CHECKPOINTING = {'bcos_vgg11', 'bcosv2_vgg11_bnu', 'bcos_inception_v3'}


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY_NAMES else n
                                  for n in ALL_NAMES])
def test_intermediates_groups_and_checkpointing_on_every_registered_name(name):
    model = timm.create_model(name).eval()
    x = _images(name)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), rtol=1e-5, atol=1e-7)
    assert len(intermediates) >= 3
    groups = timm.models.group_parameters(model, model.group_matcher())  # as timm's layer-wise lr decay uses it
    assert len(groups) >= 3 and sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    if name in NO_CHECKPOINTING:
        with pytest.raises(AssertionError, match='not supported'):
            model.set_grad_checkpointing(True)
        return
    with torch.no_grad():
        plain = model(x)
        model.set_grad_checkpointing(True)
        assert torch.allclose(model(x), plain, rtol=1e-5, atol=1e-7)
