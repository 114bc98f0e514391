"""B-cos v2 checkpoints in converted timm models: same function, same explanations, strict key mapping.

The reference is the installed ``bcos`` package (B-cos v2) built by its pretrained entrypoints
(``bcos.models.pretrained.<name>(pretrained=False)``: the released configuration), with random
weights and calibrated BN statistics. Everything is compared in float64.
"""
import math
import random

import pytest
import timm
import torch

import timm_bcos
from timm_bcos.layers import LogitLayer
from timm_bcos.weights import prepare_vgg_head
from timm_bcos.weights.v2 import (V2_ARCHS, V2_CONVERT_KWARGS, V2StateDictError, create_v2_model, guess_v2_arch,
                                  map_v2_state_dict)

v2_pretrained = pytest.importorskip('bcos.models.pretrained')

# Smallest inputs that keep every layer meaningful: ResNets/DenseNets end at 1x1 from 32 px; VGG
# needs a 2x2 final map so that the v2 head's padding=3 matters (64 px).
SIZES = {name: (64 if cfg['family'] == 'vgg' else 32) for name, cfg in V2_ARCHS.items()}
MAIN = ['resnet18', 'resnet50', 'resnext50_32x4d', 'densenet121', 'vgg11_bnu']
OTHERS = ['resnet34', 'resnet101', 'resnet152', 'densenet161', 'densenet169', 'densenet201']
DEEP = ('resnet101', 'resnet152', 'densenet169', 'densenet201')  # same code paths as the others: marked slow
BIAS = -math.log(999)
UNUSED = ('running_mean', 'num_batches_tracked')  # v2's uncentered BN never reads them in eval


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _input(name, seed=1, n=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 6, SIZES[name], SIZES[name], generator=g, dtype=torch.float64)


def _reference(name):
    """Their released configuration, random weights, BN statistics calibrated on random inputs."""
    torch.manual_seed(sum(map(ord, name)))
    ref = getattr(v2_pretrained, name)(pretrained=False).double()
    norms = [m for m in ref.modules() if hasattr(m, 'running_var')]
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    ref.train()
    with torch.no_grad():
        for seed in (11, 12):
            ref(_input(name, seed, n=2 if name == 'vgg11_bnu' else 4))
    with torch.no_grad():
        for m in norms:
            m.momentum = 0.1
            m.running_mean.normal_()  # not used by v2 (nor by us): must be carried, must not matter
    ref.requires_grad_(False)
    return ref.eval()


def _strip_logit_bias(ref, ours):
    """Random B-cos logits are tiny next to the bias -log(999): compare them without it."""
    ref.logit_layer.logit_bias = None
    for m in ours.modules():
        if isinstance(m, LogitLayer):
            m.bias = None


@pytest.fixture(scope='module', params=[pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n
                                        for n in MAIN + OTHERS])
def pair(request):
    name = request.param
    ref = _reference(name)
    sd = ref.state_dict()
    ours = create_v2_model(name).double()
    ours.load_state_dict(map_v2_state_dict(sd, ours), strict=True)
    ours.requires_grad_(False).eval()
    zero = torch.zeros_like(_input(name))
    with torch.no_grad():
        at_zero = ref(zero), ours(zero)
    _strip_logit_bias(ref, ours)
    yield dict(name=name, ref=ref, ours=ours, sd=sd, at_zero=at_zero)


def _logits(model, x):
    """Logits without the (stripped) bias: out(x) - out(0), as out(0) = 0 exactly (test_same_logit_bias)."""
    with torch.no_grad():
        return model(x)


def _explanation(model, x, idx, explain_mode):
    x = x.clone().requires_grad_()
    with torch.enable_grad(), explain_mode(model):
        out = model(x)
        out.gather(1, idx).sum().backward()
    return x.grad, out.gather(1, idx).squeeze(1).detach()


# --- the configuration table -------------------------------------------------------------------

def test_v2_archs_table_matches_the_reference_package():
    from bcos.experiments.utils import Experiment
    from bcos.modules.norms.uncentered_norms import BatchNormUncentered2d

    assert set(V2_ARCHS) == set(MAIN + OTHERS)
    for name, cfg in V2_ARCHS.items():
        assert timm.is_model(cfg['timm_arch']), name
        assert name in v2_pretrained.list_available()
        assert cfg['url'] == v2_pretrained.URLS['bcos_final'][cfg['v2_experiment']]
        assert f"{cfg['top1']:.3f}%" in getattr(v2_pretrained, name).__doc__
        assert f"{cfg['top5']:.3f}%" in getattr(v2_pretrained, name).__doc__
        assert cfg['convert_kwargs'] == V2_CONVERT_KWARGS
        model_cfg = Experiment('ImageNet', 'bcos_final', cfg['v2_experiment']).config['model']
        assert model_cfg['bcos_args'] == dict(b=2, max_out=1)
        assert model_cfg['args']['logit_bias'] == pytest.approx(BIAS)
        assert model_cfg['args'].get('logit_temperature') is None
        assert model_cfg['args']['norm_layer'](4).__class__ is BatchNormUncentered2d
        assert model_cfg['args']['norm_layer'](4).bias is None
    assert V2_CONVERT_KWARGS == dict(b=2.0, max_out=1, norm='bnu', in_chans=6, head='conv')


# --- same function ---------------------------------------------------------------------------

def test_same_logits(pair):
    ref, ours, name = pair['ref'], pair['ours'], pair['name']
    x = _input(name)
    with torch.no_grad():
        theirs = ref(x) - ref(torch.zeros_like(x))
        mine = ours(x) - ours(torch.zeros_like(x))
    assert theirs.shape == mine.shape == (2, 1000)
    assert theirs.norm() > 0 and torch.isfinite(theirs).all()
    assert _rel(mine, theirs) < 1e-10


def test_architecture_is_recognised(pair):
    assert guess_v2_arch(pair['sd']) == pair['name']
    assert guess_v2_arch(pair['ours'].state_dict()) == pair['name']


def test_same_logit_bias(pair):
    theirs, mine = pair['at_zero']
    assert torch.equal(theirs, mine)
    assert torch.allclose(mine, torch.full_like(mine, BIAS), rtol=0, atol=1e-15)
    zero = torch.zeros_like(_input(pair['name']))
    assert not _logits(pair['ours'], zero).any() and not _logits(pair['ref'], zero).any()  # bias stripped


# Deeper variants of a tested family are covered by test_same_logits and test_every_key_used_in_the_same_place.
@pytest.mark.parametrize('pair', [n for n in MAIN + OTHERS if n not in DEEP], indirect=True)
def test_same_explanations(pair):
    ref, ours, name = pair['ref'], pair['ours'], pair['name']
    x, idx = _input(name, seed=3), torch.tensor([[3], [817]])
    w_theirs, y_theirs = _explanation(ref, x, idx, lambda m: m.explanation_mode())
    w_mine, y_mine = _explanation(ours, x, idx, timm_bcos.explanation_mode)
    assert w_theirs.norm() > 0
    assert _rel(w_mine, w_theirs) < 1e-8
    # the explanation is the dynamic linear map: sum(W(x) * x) = logit (bias stripped), Eq. 13
    assert _rel((w_mine * x).sum((1, 2, 3)), y_mine) < 1e-8
    assert _rel(y_mine, y_theirs) < 1e-10


def _state_gradients(model, x, idx, skip=()):
    state = {k: (v.detach().clone().requires_grad_(v.is_floating_point() and not k.startswith(skip)))
             for k, v in model.state_dict().items()}
    with torch.enable_grad():
        out = torch.func.functional_call(model, state, (x,))
        out.gather(1, idx).sum().backward()
    return {k: v.grad for k, v in state.items()}


def test_every_key_used_in_the_same_place(pair):
    """d logit / d tensor is the same for each of their tensors and its mapped one of ours, and
    non-zero for every tensor but the BN statistics v2 never reads: each key lands where it is used."""
    ref, ours, sd, name = pair['ref'], pair['ours'], pair['sd'], pair['name']
    x, idx = _input(name, seed=4), torch.tensor([[5], [999]])
    # VGG's 100M-weight head conv is left to the perturbation test (its weight gradient is slow)
    skip_theirs, skip_mine = (('classifier.0.',), ('pre_logits.fc1.',)) if name == 'vgg11_bnu' else ((), ())
    g_theirs = _state_gradients(ref, x, idx, skip_theirs)
    g_mine = _state_gradients(ours, x, idx, skip_mine)
    mapping = _key_mapping(sd, ours)
    for k, g in g_theirs.items():
        mine = g_mine[mapping[k]]
        if k.endswith(UNUSED) or k.startswith(skip_theirs):
            assert g is None and mine is None, k
            continue
        assert g is not None and g.norm() > 0, f'{k} does not influence their logits'
        assert mine is not None and _rel(mine, g) < 1e-8, f'{k} -> {mapping[k]}'


def _key_mapping(sd, ours):
    """Their key -> ours, read off map_v2_state_dict by identity of the tensors."""
    mapped = map_v2_state_dict(sd, ours)
    by_id = {id(v): k for k, v in mapped.items()}
    mapping = {k: by_id[id(v)] for k, v in sd.items()}
    assert sorted(mapping.values()) == sorted(ours.state_dict())
    return mapping


@pytest.mark.parametrize('pair', [n for n in MAIN + OTHERS if n not in DEEP], indirect=True)
def test_perturbing_their_tensor_changes_ours(pair):
    ref, ours, sd, name = pair['ref'], pair['ours'], pair['sd'], pair['name']
    used = [k for k in sd if not k.endswith(UNUSED)]
    if name == 'resnet18':
        keys = used  # all of them
    elif name == 'vgg11_bnu':
        keys = ['features.0.linear.weight', 'classifier.0.linear.weight']  # the head conv the gradient test skips
    else:
        keys = [used[0], used[len(used) // 2], used[len(used) // 2 + 1], used[-1]] + random.Random(name).sample(used, 2)
    x = _input(name, seed=5)
    base = _logits(ours, x)
    try:
        for k in keys:
            bad = dict(sd)
            bad[k] = sd[k] * (1.5 + torch.rand_like(sd[k]))
            ref.load_state_dict(bad)
            ours.load_state_dict(map_v2_state_dict(bad, ours))
            changed, theirs = _logits(ours, x), _logits(ref, x)
            assert _rel(changed, base) > 1e-6, f'changing {k} does not change our logits'
            assert _rel(changed, theirs) < 1e-10, k
    finally:
        ref.load_state_dict(sd)
        ours.load_state_dict(map_v2_state_dict(sd, ours))


# --- errors ------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def resnet18_pair():
    ref = v2_pretrained.resnet18(pretrained=False)
    return ref.state_dict(), create_v2_model('resnet18')


def test_other_architecture_is_named(resnet18_pair):
    _, ours = resnet18_pair
    sd34 = v2_pretrained.resnet34(pretrained=False).state_dict()
    assert guess_v2_arch(sd34) == 'resnet34'
    with pytest.raises(V2StateDictError) as e:
        map_v2_state_dict(sd34, ours)
    msg = str(e.value)
    assert '80 unexpected keys: layer1.2.' in msg
    assert 'looks like B-cos v2 resnet34' in msg and 'the model like resnet18' in msg
    assert 'layer1.2.conv1.weight' in e.value.unexpected and not e.value.missing and not e.value.mismatched

    sd_dense = v2_pretrained.densenet121(pretrained=False).state_dict()
    with pytest.raises(V2StateDictError, match='missing keys.*conv1.weight') as e:
        map_v2_state_dict(sd_dense, ours)
    assert 'features.conv0.weight' in e.value.unexpected and 'fc.fc.weight' in e.value.missing


def test_other_class_count_is_named(resnet18_pair):
    sd, _ = resnet18_pair
    ours10 = create_v2_model('resnet18', num_classes=10)
    with pytest.raises(V2StateDictError) as e:
        map_v2_state_dict(sd, ours10)
    msg = str(e.value)
    assert "fc.fc.weight (checkpoint 'fc.linear.weight'): (1000, 512, 1, 1) vs model (10, 512, 1, 1)" in msg
    assert 'checkpoint has 1000 classes, the model 10' in msg and 'num_classes=1000' in msg
    assert e.value.mismatched and not e.value.unexpected and not e.value.missing

    # fine-tuning: the new classifier is kept, everything else is loaded strictly
    head = ours10.fc.fc.weight.clone()
    mapped = map_v2_state_dict(sd, ours10, allow_new_head=True)
    assert 'fc.fc.weight' not in mapped
    result = ours10.load_state_dict(mapped, strict=False)
    assert result.missing_keys == ['fc.fc.weight'] and not result.unexpected_keys
    assert torch.equal(ours10.fc.fc.weight, head) and torch.equal(ours10.conv1.weight, sd['conv1.linear.weight'])
    sd34 = v2_pretrained.resnet34(pretrained=False).state_dict()
    with pytest.raises(V2StateDictError, match='unexpected keys'):
        map_v2_state_dict(sd34, ours10, allow_new_head=True)


def test_model_not_converted_like_v2_is_refused(resnet18_pair):
    sd, _ = resnet18_pair
    for kwargs, what in ((dict(head='auto'), 'head'), (dict(norm='none'), 'norm'), (dict(b=1.5), "'b'")):
        model = timm_bcos.convert_to_bcos(timm.create_model('resnet18'), **dict(V2_CONVERT_KWARGS, **kwargs))
        with pytest.raises(V2StateDictError, match=what):
            map_v2_state_dict(sd, model)
    with pytest.raises(V2StateDictError, match='not a converted B-cos model'):
        map_v2_state_dict(sd, timm.create_model('resnet18'))
    with pytest.raises(V2StateDictError, match='ResNet/ResNeXt, DenseNet and VGG'):
        map_v2_state_dict(sd, timm_bcos.convert_to_bcos(timm.create_model('regnetx_002'), norm='bnu', max_out=1))
    with pytest.raises(V2StateDictError, match='training checkpoint'):
        map_v2_state_dict({'state_dict': sd, 'epoch': 3}, resnet18_pair[1])


def test_our_own_format_is_validated_and_kept(resnet18_pair):
    _, ours = resnet18_pair
    native = ours.state_dict()
    mapped = map_v2_state_dict(native, ours)
    assert list(mapped) == list(native) and all(mapped[k] is native[k] for k in native)
    del native['layer2.0.bn1.running_var']
    with pytest.raises(V2StateDictError, match=r'1 missing keys: layer2\.0\.bn1\.running_var'):
        map_v2_state_dict(native, ours)


def test_timm_pretrained_filter_fn(resnet18_pair):
    """timm's loader with map_v2_state_dict as pretrained_filter_fn (a state dict source: offline)."""
    sd, _ = resnet18_pair
    ours = create_v2_model('resnet18')
    cfg = dict(state_dict=sd, num_classes=1000, input_size=(6, 224, 224), first_conv='conv1', classifier='fc')
    timm.models.load_pretrained(ours, pretrained_cfg=cfg, num_classes=1000, in_chans=6, filter_fn=map_v2_state_dict)
    assert torch.equal(ours.fc.fc.weight, sd['fc.linear.weight'])
    assert torch.equal(ours.layer3[1].bn2.running_var, sd['layer3.1.bn2.running_var'])


def test_max_out_2_units_are_reordered():
    """v2 orders MaxOut units o * M + m; ours (m, o): the mapping reorders them (released weights have M=1)."""
    torch.manual_seed(0)
    ref = v2_pretrained.resnet18(pretrained=False, bcos_args=dict(b=2, max_out=2)).double().eval()
    ours = timm_bcos.convert_to_bcos(timm.create_model('resnet18'), **dict(V2_CONVERT_KWARGS, max_out=2)).double()
    ours.load_state_dict(map_v2_state_dict(ref.state_dict(), ours))
    x = torch.rand(2, 6, 32, 32, dtype=torch.float64)
    _strip_logit_bias(ref, ours)
    assert _rel(_logits(ours.eval(), x), _logits(ref, x)) < 1e-10


def test_train_mode_matches():
    """Fine-tuning starts from the same function: batch statistics and running-variance updates agree."""
    torch.manual_seed(0)
    ref = v2_pretrained.resnet18(pretrained=False).double().train()
    ours = create_v2_model('resnet18').double().train()
    ours.load_state_dict(map_v2_state_dict(ref.state_dict(), ours))
    _strip_logit_bias(ref, ours)
    x = torch.rand(4, 6, 32, 32, dtype=torch.float64)
    assert _rel(_logits(ours, x), _logits(ref, x)) < 1e-10
    mine = map_v2_state_dict(ref.state_dict(), ours)
    for k, v in ours.state_dict().items():
        assert torch.allclose(v, mine[k], rtol=1e-12, atol=0), k


# --- VGG: timm's head is not v2's ---------------------------------------------------------------

def test_vgg_needs_the_v2_head():
    """v2's first head conv is 7x7 with padding=3 and sees the map as is; timm's has no padding and
    upsamples maps smaller than 7x7. Without prepare_vgg_head the functions differ (and the
    mapping refuses the model); with it they are equal (test_same_logits[vgg11_bnu])."""
    plain = timm_bcos.convert_to_bcos(timm.create_model('vgg11_bn'), **V2_CONVERT_KWARGS)
    assert plain.pre_logits.fc1.padding == (0, 0)
    with pytest.raises(V2StateDictError, match='prepare_vgg_head'):
        map_v2_state_dict({'classifier.0.linear.weight': torch.zeros(4096, 512, 7, 7)}, plain)
    with pytest.raises(TypeError, match='timm VGG'):
        prepare_vgg_head(timm.create_model('resnet18'))


@pytest.mark.parametrize('pair', ['vgg11_bnu'], indirect=True)
def test_vgg_plain_timm_head_differs(pair):
    """The same weights in timm's own head layout (fc1 without padding, maps upsampled to 7x7)."""
    ours, ref, x = pair['ours'], pair['ref'], _input('vgg11_bnu')
    theirs = _logits(ref, x)
    mlp = ours.pre_logits
    fc1 = mlp.fc1
    plain = timm_bcos.BcosConv2d(512, 4096, 7, padding=0, b=2, max_out=1, scale=None).double()
    plain.weight = fc1.weight
    try:
        mlp.fc1, mlp.input_kernel_size = plain, 7
        assert _rel(_logits(ours, x), theirs) > 1e-2
    finally:
        mlp.fc1, mlp.input_kernel_size = fc1, 1


@pytest.mark.parametrize('name', ['resnet18', 'densenet121', 'vgg11_bnu'])
def test_release_file_through_timm(name, tmp_path, hub_offline):
    """Their state dict saved as they release it (torch.save, .pth), loaded by
    ``timm.create_model('bcosv2_<name>', pretrained=True, pretrained_cfg_overlay=dict(file=...))``:
    the same logits minus the logit bias and the same explanations, in float64."""
    import timm

    import timm_bcos

    ref = _reference(name).float()  # released weights are float32; compare in float64 from the same values
    path = tmp_path / f'{name}.pth'
    torch.save(ref.state_dict(), path)
    ref = ref.double()
    ours = timm.create_model(f'bcosv2_{name}', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = ours.double().eval()
    assert ours.pretrained_cfg['architecture'] == f'bcosv2_{name}'
    x = _input(name)
    zero = torch.zeros_like(x)
    with torch.no_grad():
        assert torch.allclose(ours(zero), ref(zero), rtol=0, atol=1e-12)  # the bias, -log(999)
        assert ours(zero)[0, 0].item() == pytest.approx(BIAS)
    _strip_logit_bias(ref, ours)
    assert _rel(_logits(ours, x), _logits(ref, x)) < 1e-10
    idx = _logits(ref, x).argmax(1, keepdim=True)
    g_ours, _ = _explanation(ours, x, idx, timm_bcos.explanation_mode)
    g_ref, _ = _explanation(ref, x, idx, lambda m: m.explanation_mode())
    assert _rel(g_ours, g_ref) < 1e-8
