"""B-cos v1 checkpoints (the paper's own models) in timm_bcos models: v1's keys, shapes and settings.

v1 (github.com/moboehle/B-cos) is not installable, so the reference here is a listing of its state
dict keys and shapes written from its model code (``models/bcos/{densenet,resnet,vgg,inception}.py``,
``experiments/CIFAR10/bcos/{model,experiment_parameters}.py``): the release files are the state dicts
of ``nn.Sequential(network, MyAdaptiveAvgPool2d, FinalLayer)`` (ImageNet keys ``0.<...>``), every conv
a v1 ``BcosConv2d`` with its weight in ``<conv>.linear.weight`` and MaxOut units in rows ``o * 2 + m``.
Random values are loaded through `map_v1_state_dict` and traced to the layers they must reach.
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_bcos
from timm_bcos.layers import BcosConv2d, BcosLinear, LogitLayer
from timm_bcos.models import load_model
from timm_bcos.weights.v1 import (V1_MODELS, V1StateDictError, create_v1_model, guess_v1_family, map_v1_state_dict,
                                  v1_weights_file)

M = 2  # MaxOut units per output in every v1 checkpoint


pytestmark = pytest.mark.usefixtures('one_thread')

# --- v1's keys and shapes, read off its model code ---------------------------------------------


def _conv(shapes, key, cin, cout, k):
    kh, kw = (k, k) if isinstance(k, int) else k
    shapes[f'{key}.linear.weight'] = (cout * M, cin, kh, kw)


def v1_densenet121(classes=1000):
    s = {}
    _conv(s, '0.features.conv0', 6, 64, 7)
    c = 64
    for b, layers in enumerate((6, 12, 24, 16), 1):
        for i in range(1, layers + 1):
            _conv(s, f'0.features.denseblock{b}.denselayer{i}.conv1', c + (i - 1) * 32, 4 * 32, 1)
            _conv(s, f'0.features.denseblock{b}.denselayer{i}.conv2', 4 * 32, 32, 3)
        c += layers * 32
        if b < 4:
            _conv(s, f'0.features.transition{b}.conv', c, c // 2, 1)
            c //= 2
    _conv(s, '0.classifier', c, classes, 1)
    return s


def v1_resnet34(classes=1000):
    s = {}
    _conv(s, '0.conv1', 6, 64, 7)
    inplanes = 64
    for stage, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
        for j in range(blocks):
            _conv(s, f'0.layer{stage}.{j}.conv1', inplanes if j == 0 else planes, planes, 3)
            _conv(s, f'0.layer{stage}.{j}.conv2', planes, planes, 3)
            if j == 0 and (stride != 1 or inplanes != planes):
                _conv(s, f'0.layer{stage}.0.downsample.0', inplanes, planes, 1)
        inplanes = planes
    _conv(s, '0.fc', 512, classes, 1)
    return s


VGG_A = [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M']


def v1_vgg11(classes=1000):
    s, c = {}, 6
    for i, v in enumerate(VGG_A):  # make_layers: a BcosConv2d or an AvgPool2d per entry
        if v != 'M':
            _conv(s, f'0.features.{i}', c, v, 3)
            c = v
    _conv(s, '0.classifier.0', 512, 4096, 7)
    _conv(s, '0.classifier.1', 4096, 4096, 1)
    _conv(s, '0.classifier.2', 4096, classes, 1)
    return s


def _inception_a(cin, pool):
    return [('branch1x1', cin, 64, 1), ('branch5x5_1', cin, 48, 1), ('branch5x5_2', 48, 64, 5),
            ('branch3x3dbl_1', cin, 64, 1), ('branch3x3dbl_2', 64, 96, 3), ('branch3x3dbl_3', 96, 96, 3),
            ('branch_pool', cin, pool, 1)]


def _inception_b(cin):
    return [('branch3x3', cin, 384, 3), ('branch3x3dbl_1', cin, 64, 1), ('branch3x3dbl_2', 64, 96, 3),
            ('branch3x3dbl_3', 96, 96, 3)]


def _inception_c(cin, c7):
    return [('branch1x1', cin, 192, 1), ('branch7x7_1', cin, c7, 1), ('branch7x7_2', c7, c7, (1, 7)),
            ('branch7x7_3', c7, 192, (7, 1)), ('branch7x7dbl_1', cin, c7, 1), ('branch7x7dbl_2', c7, c7, (7, 1)),
            ('branch7x7dbl_3', c7, c7, (1, 7)), ('branch7x7dbl_4', c7, c7, (7, 1)),
            ('branch7x7dbl_5', c7, 192, (1, 7)), ('branch_pool', cin, 192, 1)]


def _inception_d(cin):
    return [('branch3x3_1', cin, 192, 1), ('branch3x3_2', 192, 320, 3), ('branch7x7x3_1', cin, 192, 1),
            ('branch7x7x3_2', 192, 192, (1, 7)), ('branch7x7x3_3', 192, 192, (7, 1)), ('branch7x7x3_4', 192, 192, 3)]


def _inception_e(cin):
    return [('branch1x1', cin, 320, 1), ('branch3x3_1', cin, 384, 1), ('branch3x3_2a', 384, 384, (1, 3)),
            ('branch3x3_2b', 384, 384, (3, 1)), ('branch3x3dbl_1', cin, 448, 1), ('branch3x3dbl_2', 448, 384, 3),
            ('branch3x3dbl_3a', 384, 384, (1, 3)), ('branch3x3dbl_3b', 384, 384, (3, 1)),
            ('branch_pool', cin, 192, 1)]


def v1_inception_v3(classes=1000):
    s = {}
    for name, cin, cout, k in (('Conv2d_1a_3x3', 6, 32, 3), ('Conv2d_2a_3x3', 32, 32, 3), ('Conv2d_2b_3x3', 32, 64, 3),
                               ('Conv2d_3b_1x1', 64, 80, 1), ('Conv2d_4a_3x3', 80, 192, 3)):
        _conv(s, f'0.{name}.conv', cin, cout, k)  # BasicConv2d: a BcosConv2d `conv`
    blocks = [('Mixed_5b', _inception_a(192, 32)), ('Mixed_5c', _inception_a(256, 64)),
              ('Mixed_5d', _inception_a(288, 64)), ('Mixed_6a', _inception_b(288)),
              ('Mixed_6b', _inception_c(768, 128)), ('Mixed_6c', _inception_c(768, 160)),
              ('Mixed_6d', _inception_c(768, 160)), ('Mixed_6e', _inception_c(768, 192)),
              ('AuxLogits', [('conv0', 768, 128, 1), ('conv1', 128, 768, 5)]),  # aux_logits=True in the experiment
              ('Mixed_7a', _inception_d(768)), ('Mixed_7b', _inception_e(1280)), ('Mixed_7c', _inception_e(2048))]
    for block, convs in blocks:
        for name, cin, cout, k in convs:
            _conv(s, f'0.{block}.{name}.conv', cin, cout, k)
        if block == 'AuxLogits':
            _conv(s, '0.AuxLogits.fc', 768, classes, 1)
    _conv(s, '0.fc', 2048, classes, 1)
    return s


def v1_cifar(classes=10):
    s = {}
    out_c = [64, 64, 128, 128, 128, 256, 256, 256, classes]  # default_config: out_c, kernel_sizes [3] * 8 + [1]
    cin = 6
    for i, c in enumerate(out_c):
        _conv(s, str(i), cin, c, 3 if i < 8 else 1)
        cin = c
    return s


V1_KEYS = {'densenet': v1_densenet121, 'resnet': v1_resnet34, 'vgg': v1_vgg11, 'inception': v1_inception_v3,
           'simple': v1_cifar}


def _vgg_timm_index():
    """v1 features index -> timm's (timm keeps conv, act per conv and a pool per 'M')."""
    out, j = {}, 0
    for i, v in enumerate(VGG_A):
        if v == 'M':
            j += 1
        else:
            out[i], j = j, j + 2
    return out


def our_key(family, v1_key):
    """Where a v1 key must land (None: dropped), written independently of map_v1_state_dict."""
    key = v1_key[:-len('.linear.weight')]
    if family == 'simple':
        return 'classifier.weight' if key == '8' else f'features.{key}.weight'
    key = key[2:]  # the Sequential's index 0
    if key.startswith('AuxLogits.'):
        return None
    if family == 'vgg':
        head = {'classifier.0': 'pre_logits.fc1', 'classifier.1': 'pre_logits.fc2', 'classifier.2': 'head.fc.fc'}
        if key in head:
            return head[key] + '.weight'
        return f'features.{_vgg_timm_index()[int(key.split(".")[1])]}.weight'
    if key in ('classifier', 'fc'):
        return f'{key}.fc.weight'
    return key + '.weight'


# v1's settings per checkpoint, from its experiment files (FinalLayer(bias, norm=temperature)) and
# BcosConv2d(scale_fact=...) in its model files.
IMAGENET_BIAS, CIFAR_BIAS = math.log(0.01 / 0.99), math.log(0.1 / 0.9)
V1_SETTINGS = {
    'densenet121.v1_in1k': dict(temperature=1e-3, scale_fact=100, top1=73.3, token='LW2HsNDzAzaaaDH'),
    'densenet121.v1_in1k_long': dict(temperature=1e-3, scale_fact=100, top1=74.4, token='G8kdm73qWn4L8Lg'),
    'resnet34.v1_in1k': dict(temperature=10, scale_fact=100, top1=71.7, token='mYe6TggQsDymZbk'),
    'vgg11.v1_in1k': dict(temperature=0.1, scale_fact=1000, top1=69.6, token='kEHgFSSKMEdeA5N'),
    'inception_v3.v1_in1k': dict(temperature=1, scale_fact=200, top1=75.4, token='QSEo6QSNgPZqNfi'),
}
for _b, _t, _token, _top1 in ((1, -3, 'q8cRRojXZ2WNWbS', 93.5), (1.25, -3, 'oX6H7jQiSN2dfWJ', 93.8),
                              (1.5, -2, '3LxnBCarS8Lpq5b', 93.7), (1.75, 1, 'XLwEnaKr9bYQJaN', 93.7),
                              (2, 2, 'mksX2CJMCDQbMYb', 93.2), (2.25, 2, 'qFsqLPdHLQyNHwH', 92.6),
                              (2.5, 3, 'XwEAFrPSEYJ2C79', 92.4)):
    V1_SETTINGS['simple_cifar.v1_cifar10_b' + f'{_b:g}'.replace('.', '_')] = dict(
        b=_b, temperature=10 ** _t, scale=10 ** (-2 + 1.5 * (2.5 - _b)), top1=_top1, token=_token)

# Smallest inputs that run every layer (Inception: 75 px ends at 1x1 after Mixed_7a).
SIZES = {'densenet': 32, 'resnet': 32, 'vgg': 32, 'inception': 75, 'simple': 32}
LOADED = ['densenet121.v1_in1k', 'resnet34.v1_in1k', 'vgg11.v1_in1k', 'inception_v3.v1_in1k',
          'simple_cifar.v1_cifar10_b1', 'simple_cifar.v1_cifar10_b1_5', 'simple_cifar.v1_cifar10_b2_5']
HEAVY = ('vgg11.v1_in1k', 'inception_v3.v1_in1k')


def _family(tag):
    return V1_MODELS[tag]['family']


def _random_v1_state_dict(tag, classes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = V1_KEYS[_family(tag)]() if classes is None else V1_KEYS[_family(tag)](classes)
    return {k: torch.randn(shape, generator=g) for k, shape in keys.items()}


def _input(tag, dtype=torch.float32, seed=1):
    s = SIZES[_family(tag)]
    return torch.rand(1, 6, s, s, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(scope='module', params=[pytest.param(t, marks=pytest.mark.slow) if t in HEAVY else t for t in LOADED])
def loaded(request):
    tag = request.param
    sd = _random_v1_state_dict(tag)
    model = create_v1_model(tag)
    model.load_state_dict(map_v1_state_dict(sd, model), strict=True)
    model.requires_grad_(False).eval()
    yield dict(tag=tag, sd=sd, model=model)


def _reordered(w):
    """v1's MaxOut row o * M + m -> our row m * O + o."""
    return w.view(-1, M, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


# --- the table ---------------------------------------------------------------------------------

def test_v1_models_table():
    assert set(V1_MODELS) == set(V1_SETTINGS)
    assert len({c['url'] for c in V1_MODELS.values()}) == len({c['file_name'] for c in V1_MODELS.values()}) == 12
    for tag, cfg in V1_MODELS.items():
        want = V1_SETTINGS[tag]
        assert cfg['url'] == f'https://nextcloud.mpi-klsb.mpg.de/index.php/s/{want["token"]}/download'
        assert want['token'] in cfg['file_name'] and cfg['file_name'].endswith('.pth')
        assert cfg['top1'] == want['top1']
        if cfg['family'] == 'simple':
            kw = cfg['simple_kwargs']
            assert kw['b'] == want['b'] and kw['max_out'] == M and kw['in_chans'] == 6
            assert kw['scale'] == pytest.approx(want['scale'], rel=1e-12)
            assert kw['logit_temperature'] == pytest.approx(want['temperature'], rel=1e-12)
            assert kw['logit_bias'] == pytest.approx(CIFAR_BIAS, rel=1e-12)
            assert cfg['num_classes'] == 10 and cfg['input_size'] == (6, 32, 32)
        else:
            assert timm.is_model(cfg['timm_arch'])
            assert cfg['convert_kwargs'] == dict(b=2.0, max_out=M, norm='none', in_chans=6, head='conv',
                                                 logit_bias=IMAGENET_BIAS, logit_temperature=want['temperature'])
            assert cfg['scale_factor'] == want['scale_fact'] and cfg['num_classes'] == 1000
    assert V1_MODELS['inception_v3.v1_in1k']['input_size'] == (6, 299, 299)


# --- keys land where they belong ---------------------------------------------------------------

def test_every_v1_key_lands_in_its_layer(loaded):
    """Each v1 tensor, MaxOut rows reordered, is the weight of the layer named after it; nothing is left over."""
    tag, sd, model = loaded['tag'], loaded['sd'], loaded['model']
    family = _family(tag)
    ours = model.state_dict()
    targets = {}
    for k, w in sd.items():
        target = our_key(family, k)
        if target is None:
            continue
        assert target in ours, f'{k} -> {target}'
        assert torch.equal(ours[target], _reordered(w).to(ours[target].dtype)), f'{k} -> {target}'
        targets[target] = k
    assert set(targets) == set(ours)  # every model tensor comes from exactly one v1 tensor
    if family == 'inception':
        assert sum(k.startswith('0.AuxLogits.') for k in sd) == 3 and not hasattr(model.AuxLogits, 'fc')


# v1 (kernel from the shape, stride, padding) of the layers the perturbation test follows
V1_GEOMETRY = {
    '0.features.conv0': (2, 3), '0.features.denseblock2.denselayer3.conv2': (1, 1),
    '0.features.transition3.conv': (1, 0), '0.classifier': (1, 0), '0.conv1': (2, 3), '0.layer2.0.downsample.0': (2, 0), '0.layer3.1.conv1': (1, 1),
    '0.fc': (1, 0), '0.features.0': (1, 1), '0.features.7': (1, 1), '0.classifier.0': (1, 3), '0.classifier.2': (1, 0),
    '0.Conv2d_1a_3x3.conv': (2, 0), '0.Mixed_6b.branch7x7_2.conv': (1, (0, 3)),
    '0.Mixed_7c.branch3x3dbl_3b.conv': (1, (1, 0)),
    **{str(i): (s, 1 if i < 8 else 0) for i, s in enumerate([1, 1, 2, 1, 1, 2, 1, 1, 1])},  # CIFAR default_config
}


def _perturbation_keys(tag, sd):
    family, keys = _family(tag), list(sd)
    if family == 'simple':
        return keys if tag == 'simple_cifar.v1_cifar10_b1_5' else [keys[0], keys[-1]]
    return {
        'densenet': ['0.features.conv0.linear.weight', '0.features.denseblock2.denselayer3.conv2.linear.weight',
                     '0.features.transition3.conv.linear.weight', '0.classifier.linear.weight'],
        'resnet': ['0.conv1.linear.weight', '0.layer2.0.downsample.0.linear.weight', '0.layer3.1.conv1.linear.weight',
                   '0.fc.linear.weight'],
        'vgg': ['0.features.0.linear.weight', '0.features.7.linear.weight', '0.classifier.0.linear.weight',
                '0.classifier.2.linear.weight'],
        'inception': ['0.Conv2d_1a_3x3.conv.linear.weight', '0.Mixed_6b.branch7x7_2.conv.linear.weight',
                      '0.Mixed_7c.branch3x3dbl_3b.conv.linear.weight', '0.fc.linear.weight'],
    }[family]


def v1_unit(x, w, b, scale, stride, padding, cos_eps=0.0):
    """A v1 B-cos conv from its definition (paper Eq. 9, 17), on v1's weight layout: rows o * M + m
    are the MaxOut units of output o; ``out = max_m(w_m x) |cos|^(B-1) / scale`` (``cos_eps``: v1
    adds 1e-6 to |cos| for B not in {1, 2}). Patches by F.unfold: independent of both implementations."""
    kh, kw = w.shape[-2:]
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    patches = F.unfold(x, (kh, kw), padding=(ph, pw), stride=stride)  # (N, C kh kw, L)
    wn = w.flatten(1) / w.flatten(1).norm(dim=1, keepdim=True)
    lin = torch.einsum('rd,ndl->nrl', wn, patches)
    sel = lin.view(x.shape[0], -1, M, lin.shape[-1]).max(2).values  # (N, O, L)
    if b != 1:
        norm = (patches.square().sum(1, keepdim=True) + 1e-6).sqrt()
        sel = sel * ((sel / norm).abs() + cos_eps).pow(b - 1)
    h = (x.shape[2] + 2 * ph - kh) // stride + 1
    return (sel / scale).view(x.shape[0], -1, h, (x.shape[3] + 2 * pw - kw) // stride + 1)


def _run_with_hook(model, module, x):
    seen = {}

    def hook(mod, inputs, output):
        seen['input'], seen['output'] = inputs[0].detach().clone(), output.detach().clone()

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen['input'], seen['output']


def test_perturbing_a_v1_tensor_changes_exactly_its_layer(loaded):
    """New weights for both MaxOut units (v1 rows 2o, 2o+1) of output o in one v1 tensor: the model's
    forward reaches the target layer with the same input, and only its output channel o changes."""
    tag, sd, model = loaded['tag'], loaded['sd'], loaded['model']
    family = _family(tag)
    x = _input(tag)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for k in _perturbation_keys(tag, sd):
            target = our_key(family, k).rpartition('.')[0]
            layer = model.get_submodule(target)
            o = sd[k].shape[0] // M - 2  # a late output: a wrong unit order moves it to another channel
            x_in, y = _run_with_hook(model, layer, x)
            bad = dict(sd)
            bad[k] = sd[k].clone()
            bad[k][o * M:(o + 1) * M] = torch.randn((M,) + sd[k].shape[1:], generator=torch.Generator().manual_seed(7))
            model.load_state_dict(map_v1_state_dict(bad, model), strict=True)
            changed = [n for n, v in model.state_dict().items() if not torch.equal(v, before[n])]
            assert changed == [our_key(family, k)], k
            x_in2, y2 = _run_with_hook(model, layer, x)
            assert torch.equal(x_in, x_in2), f'{k}: the input of {target} changed'
            diff = (y2 - y).abs().flatten(2).amax((0, 2))
            assert diff[o] > 0, f'{k}: {target} output channel {o} did not change'
            assert torch.count_nonzero(diff) == 1, f'{k}: other channels of {target} changed'
            # and the layer computes v1's unit on v1's tensor: layout, stride, padding and scale
            stride, padding = V1_GEOMETRY[k[:-len('.linear.weight')]]
            want = v1_unit(x_in2, bad[k], V1_SETTINGS[tag].get('b', 2), _v1_layer_scale(tag, k, sd), stride, padding)
            assert ((y2 - want).norm() / want.norm()).item() < 1e-4, k
            model.load_state_dict(before)
    finally:
        model.load_state_dict(before)


# --- v1's settings -----------------------------------------------------------------------------

def _v1_layer_scale(tag, key, sd):
    want = V1_SETTINGS[tag]
    if 'scale' in want:
        return want['scale']
    _, cin, kh, kw = sd[key].shape
    return math.sqrt(kh * kw) * math.sqrt(cin) / want['scale_fact']


def _v1_scale(m, scale_fact):
    """v1: (k if int else sqrt(k_h k_w)) * sqrt(C_in) / scale_fact."""
    kh, kw = (m.kernel_size if isinstance(m, BcosConv2d) else (1, 1))
    cin = m.in_channels if isinstance(m, BcosConv2d) else m.in_features
    return math.sqrt(kh * kw) * math.sqrt(cin) / scale_fact


@pytest.mark.parametrize('tag', sorted(set(V1_MODELS) - set(HEAVY) - {'densenet121.v1_in1k_long'})
                         + [pytest.param(t, marks=pytest.mark.slow) for t in HEAVY + ('densenet121.v1_in1k_long',)])
def test_logit_layer_scales_and_b_are_v1s(tag):
    model = create_v1_model(tag)
    want = V1_SETTINGS[tag]
    logits = [m for m in model.modules() if isinstance(m, LogitLayer)]
    assert len(logits) == 1
    bias = CIFAR_BIAS if _family(tag) == 'simple' else IMAGENET_BIAS
    assert logits[0].bias == pytest.approx(bias, rel=1e-12)
    assert logits[0].temperature == pytest.approx(want['temperature'], rel=1e-12)
    layers = [m for m in model.modules() if isinstance(m, (BcosConv2d, BcosLinear))]
    assert len(layers) == sum(1 for k in V1_KEYS[_family(tag)]() if 'AuxLogits' not in k)
    for m in layers:
        expected = want['scale'] if 'scale' in want else _v1_scale(m, want['scale_fact'])
        assert m.scale == pytest.approx(expected, rel=1e-12)
        assert m.b == want.get('b', 2) and m.max_out == M
    assert not timm_bcos.unconverted_modules(model)
    assert not any(isinstance(m, (torch.nn.MaxPool2d, torch.nn.AdaptiveMaxPool2d)) for m in model.modules())


def test_dynamic_linearity_float64(loaded):
    model = loaded['model'].double()
    try:
        x = _input(loaded['tag'], torch.float64)
        assert timm_bcos.check_dynamic_linearity(model, x) < 1e-10
        with torch.no_grad():
            zero = model(torch.zeros_like(x))
        bias = CIFAR_BIAS if _family(loaded['tag']) == 'simple' else IMAGENET_BIAS
        assert torch.allclose(zero, torch.full_like(zero, bias), rtol=0, atol=1e-15)
    finally:
        model.float()


@pytest.mark.parametrize('b', [1, 1.5, 2, 2.5])
def test_cifar_logits_are_v1s(b):
    """The whole CIFAR net against v1's definition on v1's tensors (v1_unit, global average pool,
    FinalLayer: x / T + bias), in float64. Exact for B in {1, 2}; for other B v1 adds 1e-6 to |cos|
    (the "unnecessary doubling of stabilising term"), which we do not: a tiny relative difference."""
    tag = 'simple_cifar.v1_cifar10_b' + f'{b:g}'.replace('.', '_')
    want = V1_SETTINGS[tag]
    sd = {k: v.double() for k, v in _random_v1_state_dict(tag, seed=3).items()}
    model = create_v1_model(tag, state_dict=sd).double().eval()
    x = torch.rand(2, 6, 32, 32, dtype=torch.float64)

    def theirs(cos_eps):
        h = x
        for i in range(9):
            stride, padding = V1_GEOMETRY[str(i)]
            h = v1_unit(h, sd[f'{i}.linear.weight'], b, want['scale'], stride, padding, cos_eps)
        return h.mean((2, 3)) / want['temperature'] + CIFAR_BIAS

    with torch.no_grad():
        ours, exact = model(x), theirs(0.0)
        v1 = theirs(0.0 if b in (1, 2) else 1e-6)
    bias = torch.full_like(ours, CIFAR_BIAS)
    assert (ours - bias).abs().max() > 1e-3  # not just the bias
    assert ((ours - exact).norm() / (exact - bias).norm()).item() < 1e-10
    rel_v1 = ((ours - v1).norm() / (v1 - bias).norm()).item()
    assert rel_v1 < (1e-10 if b in (1, 2) else 1e-3), rel_v1


@pytest.mark.parametrize('loaded', [t for t in LOADED if not t.startswith('simple_cifar')], indirect=True)
def test_v1_pools(loaded):
    """v1's average pools where timm has max-pools, same kernel/stride/padding; VGG's head keeps the map size."""
    tag, model = loaded['tag'], loaded['model']
    family = _family(tag)
    if family == 'densenet':
        assert repr(model.features.pool0) == repr(torch.nn.AvgPool2d(3, 2, 1))
        assert repr(model.features.transition2.pool) == repr(torch.nn.AvgPool2d(2, 2))
    elif family == 'resnet':
        assert repr(model.maxpool) == repr(torch.nn.AvgPool2d(3, 2, 1))
    elif family == 'vgg':
        pools = [m for m in model.features if isinstance(m, torch.nn.AvgPool2d)]
        assert len(pools) == 5 and all(repr(p) == repr(torch.nn.AvgPool2d(2, 2)) for p in pools)
        fc1 = model.pre_logits.fc1
        assert fc1.kernel_size == (7, 7) and fc1.padding == (3, 3) and model.pre_logits.input_kernel_size == 1
        x_in, y = _run_with_hook(model, fc1, _input(tag))
        assert x_in.shape[-2:] == y.shape[-2:] == (1, 1)  # no upsampling to 7x7 (32 px)
    elif family == 'inception':
        assert repr(model.Pool1) == repr(model.Pool2) == repr(torch.nn.AvgPool2d(3, 2))
        x = torch.rand(1, 6, 96, 96)
        for block, pooled in (('Mixed_6a', 288), ('Mixed_7a', 768)):  # functional max-pools in timm's forward
            x_in, y = _run_with_hook(model, model.get_submodule(block), x)
            assert torch.allclose(y[:, -pooled:], F.avg_pool2d(x_in, 3, 2), rtol=1e-6, atol=0)


# --- the release-file formats, errors ----------------------------------------------------------

@pytest.fixture(scope='module')
def resnet34():
    return create_v1_model('resnet34.v1_in1k')


def test_key_formats_accepted(resnet34):
    sd = _random_v1_state_dict('resnet34.v1_in1k')
    reference = map_v1_state_dict(sd, resnet34)
    for variant in ({k[2:]: v for k, v in sd.items()},  # v1 network's own state_dict()
                    {'module.' + k: v for k, v in sd.items()}):  # saved from DataParallel
        mapped = map_v1_state_dict(variant, resnet34)
        assert mapped.keys() == reference.keys() and all(torch.equal(mapped[k], reference[k]) for k in mapped)
    native = resnet34.state_dict()
    kept = map_v1_state_dict(native, resnet34)  # our format: validated, not reordered
    assert all(kept[k] is native[k] for k in native)
    assert guess_v1_family(sd) == guess_v1_family(native) == 'resnet'
    assert guess_v1_family(v1_cifar()) == 'simple' and guess_v1_family(v1_vgg11()) == 'vgg'


def test_other_architecture_is_named(resnet34):
    sd = {k: torch.zeros(s) for k, s in v1_densenet121().items()}
    with pytest.raises(V1StateDictError) as e:
        map_v1_state_dict(sd, resnet34)
    msg = str(e.value)
    assert 'looks like a B-cos v1 densenet, the model is a resnet' in msg
    assert 'features.conv0.weight' in e.value.unexpected and 'conv1.weight' in e.value.missing
    assert isinstance(e.value, ValueError) and isinstance(e.value, timm_bcos.CheckpointMismatchError)


def test_missing_extra_and_misshaped_keys_are_named(resnet34):
    sd = _random_v1_state_dict('resnet34.v1_in1k')
    bad = dict(sd)
    del bad['0.layer2.1.conv2.linear.weight']
    bad['0.layer9.linear.weight'] = torch.zeros(2, 2, 1, 1)
    bad['0.layer1.0.conv1.linear.weight'] = torch.zeros(128, 64, 1, 1)
    with pytest.raises(V1StateDictError) as e:
        map_v1_state_dict(bad, resnet34)
    assert e.value.missing == ['layer2.1.conv2.weight'] and e.value.unexpected == ['layer9.weight']
    assert e.value.mismatched == ["layer1.0.conv1.weight (checkpoint '0.layer1.0.conv1.linear.weight'): "
                                  "(128, 64, 1, 1) vs model (128, 64, 3, 3)"]
    with pytest.raises(V1StateDictError, match='training checkpoint'):
        map_v1_state_dict({'state_dict': sd, 'epoch': 3}, resnet34)


def test_other_class_count(resnet34):
    sd = _random_v1_state_dict('resnet34.v1_in1k')
    model = create_v1_model('resnet34.v1_in1k', num_classes=10)
    with pytest.raises(V1StateDictError, match='checkpoint has 1000 classes, the model 10.*num_classes=1000'):
        map_v1_state_dict(sd, model)
    head = model.fc.fc.weight.clone()
    mapped = map_v1_state_dict(sd, model, allow_new_head=True)
    assert 'fc.fc.weight' not in mapped
    result = model.load_state_dict(mapped, strict=False)
    assert result.missing_keys == ['fc.fc.weight'] and not result.unexpected_keys
    assert torch.equal(model.fc.fc.weight, head)


def test_model_not_built_like_v1_is_refused(resnet34):
    sd = _random_v1_state_dict('resnet34.v1_in1k')
    plain = timm_bcos.convert_to_bcos(timm.create_model('resnet34'), head='conv')  # paper design, no v1 settings
    with pytest.raises(V1StateDictError, match='logit_temperature.*create_v1_model'):
        map_v1_state_dict(sd, plain)
    with pytest.raises(V1StateDictError, match='not a converted B-cos model'):
        map_v1_state_dict(sd, timm.create_model('resnet34'))
    with pytest.raises(V1StateDictError, match='BcosSimpleNet only'):
        map_v1_state_dict(sd, timm_bcos.convert_to_bcos(timm.create_model('regnetx_002')))
    cifar = create_v1_model('simple_cifar.v1_cifar10_b2')
    cifar.features[3].scale = 1.0
    with pytest.raises(V1StateDictError, match=r'scale.*features\.3'):
        map_v1_state_dict(_random_v1_state_dict('simple_cifar.v1_cifar10_b2'), cifar)


def test_vgg_needs_v1_head_and_scales():
    """Keys alone would fit timm's own VGG head and convert_to_bcos's default scale: both are refused."""
    plain = timm_bcos.convert_to_bcos(timm.create_model('vgg11'), **V1_MODELS['vgg11.v1_in1k']['convert_kwargs'])
    with pytest.raises(V1StateDictError) as e:
        map_v1_state_dict({'0.features.0.linear.weight': torch.zeros(128, 6, 3, 3)}, plain)
    assert 'prepare_vgg_head' in str(e.value) and 'scale' in str(e.value)


@pytest.mark.slow
def test_inception_aux_head_is_checked_and_dropped():
    sd = {k: torch.zeros(s) for k, s in v1_inception_v3().items()}
    model = create_v1_model('inception_v3.v1_in1k')
    assert not model.aux_logits and model.AuxLogits is None
    mapped = map_v1_state_dict(sd, model)
    assert not any('AuxLogits' in k for k in mapped)
    bad = dict(sd)
    bad['0.AuxLogits.fc.linear.weight'] = torch.zeros(20, 768, 1, 1)
    with pytest.raises(V1StateDictError, match=r'AuxLogits\.fc\.weight.*auxiliary head'):
        map_v1_state_dict(bad, model)
    del bad['0.AuxLogits.fc.linear.weight']
    with pytest.raises(V1StateDictError, match=r'missing keys: AuxLogits\.fc\.weight'):
        map_v1_state_dict(bad, model)
    no_aux = {k: v for k, v in sd.items() if 'AuxLogits' not in k}  # a v1 Inception3(aux_logits=False)
    assert map_v1_state_dict(no_aux, model).keys() == mapped.keys()


def test_release_file_through_timm(tmp_path):
    """A CIFAR release file (torch.save of v1's nn.Sequential state dict) through timm's loader, with
    map_v1_state_dict as pretrained_filter_fn: the same function as loading it directly."""
    tag = 'simple_cifar.v1_cifar10_b1_25'
    sd = _random_v1_state_dict(tag)
    path = tmp_path / V1_MODELS[tag]['file_name']
    torch.save(sd, path)
    direct = create_v1_model(tag, state_dict=sd).eval()
    model = create_v1_model(tag)
    cfg = dict(file=str(path), num_classes=10, input_size=(6, 32, 32), first_conv='features.0',
               classifier='classifier')
    timm.models.load_pretrained(model, pretrained_cfg=cfg, num_classes=10, in_chans=6, filter_fn=map_v1_state_dict)
    x = _input(tag)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), direct(x))
    assert v1_weights_file(tag, cache_dir=str(tmp_path)) == str(path)


def test_weights_file_offline(tmp_path, hub_offline):
    with pytest.raises(timm_bcos.PretrainedWeightsError, match='bcos_v1_resnet_34-mYe6TggQsDymZbk.pth'):
        v1_weights_file('resnet34.v1_in1k', cache_dir=str(tmp_path))
    with pytest.raises(KeyError, match='known'):
        v1_weights_file('resnet50.v1_in1k')


# --- registered with timm: bcos_<arch>.v1_* --------------------------------------------------

REGISTERED = ['densenet121.v1_in1k_long', 'densenet121.v1_in1k', 'resnet34.v1_in1k', 'vgg11.v1_in1k',
              'inception_v3.v1_in1k'] + [f'simple_cifar.v1_cifar10_b{b}' for b in
                                         ('1', '1_25', '1_5', '1_75', '2', '2_25', '2_5')]
# the classifier in our converted model (BcosConvClassifier.fc), and the stem
HEADS = {'densenet': ('classifier.fc', 'features.conv0'), 'resnet': ('fc.fc', 'conv1'),
         'vgg': ('head.fc.fc', 'features.0'), 'inception': ('fc.fc', 'Conv2d_1a_3x3.conv'),
         'simple': ('classifier', 'features.0')}


@pytest.fixture
def offline(monkeypatch, tmp_path, hub_offline):
    """HF_HUB_OFFLINE=1 and an empty timm cache ($TORCH_HOME/hub/checkpoints) under tmp_path."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    return tmp_path / 'torch' / 'hub' / 'checkpoints'


def test_registered_pretrained_cfgs():
    assert {f'bcos_{t}' for t in REGISTERED} <= set(timm.list_pretrained('bcos_*'))
    assert set(REGISTERED) == set(V1_MODELS)
    for tag in REGISTERED:
        cfg, v1 = timm.models.get_pretrained_cfg(f'bcos_{tag}'), V1_MODELS[tag]
        family = _family(tag)
        assert cfg.tag == tag.split('.')[1] and cfg.architecture == f'bcos_{tag.split(".")[0]}'
        assert cfg.url == v1['url'] and cfg.num_classes == v1['num_classes'] and cfg.input_size == v1['input_size']
        assert cfg.mean == (0.0,) and cfg.std == (1.0,) and cfg.interpolation == 'bilinear'
        assert (cfg.classifier, cfg.first_conv) == HEADS[family]
        assert cfg.paper_ids == 'arXiv:2205.10268' and cfg.origin_url == 'https://github.com/moboehle/B-cos'
        assert cfg.license == 'other' and any('license unclear' in n for n in cfg.notes)
        assert f'top-1 {V1_SETTINGS[tag]["top1"]}%' in cfg.description and 'reported by the authors' in cfg.description
        assert ('Tab. 1' if family == 'simple' else 'Tab. 2') in cfg.description
    assert timm.models.get_pretrained_cfg('bcos_inception_v3').crop_pct == pytest.approx(299 / 320)


def test_default_tags():
    """bcos_densenet121 is v1's best DenseNet-121 ("training+", 74.4%); bcos_simple_cifar stays our design."""
    assert timm.models.get_pretrained_cfg('bcos_densenet121').tag == 'v1_in1k_long'
    for arch in ('resnet34', 'vgg11', 'inception_v3'):
        assert timm.models.get_pretrained_cfg(f'bcos_{arch}').tag == 'v1_in1k'
    model = timm.create_model('bcos_densenet121')
    assert model.pretrained_cfg['tag'] == 'v1_in1k_long' and model.bcos_cfg['v1_tag'] == 'densenet121.v1_in1k_long'
    assert model.bcos_cfg['head'] == 'conv' and model.bcos_cfg['logit_temperature'] == 1e-3
    simple = timm.create_model('bcos_simple_cifar', widths=(8,) * 8)
    assert 'tag' not in simple.pretrained_cfg and not simple.pretrained_cfg['url'] and 'v1_tag' not in simple.bcos_cfg
    assert simple.features[0].out_channels == 8 and simple.logit.temperature is None
    assert timm.create_model('bcos_resnet18').pretrained_cfg.get('tag') is None  # no v1 weights: generic design


def _save_v1(tag, path, classes=None):
    sd = _random_v1_state_dict(tag, classes)
    torch.save(sd, path)
    return sd


def _same_model(a, b, tag):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = _input(tag)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize('tag', ['densenet121.v1_in1k', 'resnet34.v1_in1k', 'simple_cifar.v1_cifar10_b1_5']
                         + [pytest.param(t, marks=pytest.mark.slow) for t in HEAVY])
def test_release_file_through_timm_create_model(tag, tmp_path):
    """timm.create_model('bcos_<tag>', pretrained=True, file=...) == create_v1_model(tag, state_dict=...)."""
    sd = _save_v1(tag, tmp_path / 'w.pth')
    model = timm.create_model(f'bcos_{tag}', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.pth')))
    assert model.pretrained_cfg['tag'] == tag.split('.')[1] and model.bcos_cfg['v1_tag'] == tag
    classifier, stem = HEADS[_family(tag)]
    assert model.get_submodule(classifier).weight.shape[0] == V1_MODELS[tag]['num_classes'] * M
    assert model.get_submodule(stem).in_channels == 6
    _same_model(model, create_v1_model(tag, state_dict=sd), tag)


def test_default_tag_from_the_cache_offline(offline):
    """The release file under its unique name in timm's cache: bcos_densenet121 loads it with no network."""
    tag = 'densenet121.v1_in1k_long'
    offline.mkdir(parents=True)
    sd = _save_v1(tag, offline / V1_MODELS[tag]['file_name'])
    model = timm.create_model('bcos_densenet121', pretrained=True)
    assert model.pretrained_cfg['file'] == str(offline / V1_MODELS[tag]['file_name'])
    reference = create_v1_model(tag, state_dict=sd)
    _same_model(model, reference, tag)
    _same_model(load_model('bcos_densenet121'), reference, tag)  # the CLI's loader: the default tag


def test_missing_weights_offline_name_url_and_cache(offline, tmp_path):
    with pytest.raises(timm_bcos.PretrainedWeightsError) as e:
        timm.create_model('bcos_resnet34', pretrained=True)
    path = offline / 'bcos_v1_resnet_34-mYe6TggQsDymZbk.pth'
    assert V1_MODELS['resnet34.v1_in1k']['url'] in str(e.value) and str(path) in str(e.value)
    assert 'HF_HUB_OFFLINE=1' in str(e.value) and not path.exists()
    with pytest.raises(timm_bcos.PretrainedWeightsError, match=str(tmp_path / 'mine')):
        timm.create_model('bcos_simple_cifar.v1_cifar10_b2', pretrained=True, cache_dir=str(tmp_path / 'mine'))


def test_other_class_count_drops_the_v1_head(tmp_path):
    tag = 'resnet34.v1_in1k'
    sd = _save_v1(tag, tmp_path / 'w.pth')
    model = timm.create_model(f'bcos_{tag}', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.pth')))
    assert model.fc.fc.weight.shape == (10 * M, 512, 1, 1) and model.num_classes == 10
    loaded, reference = model.state_dict(), create_v1_model(tag, state_dict=sd).state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference if k != 'fc.fc.weight')
    with torch.no_grad():
        assert model.eval()(_input(tag)).shape == (1, 10)


def test_overrides_of_a_v1_tag(tmp_path):
    """Conversion settings override v1's, other kwargs reach timm (or BcosSimpleNet); loading v1's
    weights into a model built with other settings is refused, naming them."""
    model = timm.create_model('bcos_resnet34.v1_in1k', b=2.5, logit_temperature=1.0, drop_rate=0.25)
    convs = [m for m in model.modules() if isinstance(m, BcosConv2d)]
    assert all(c.b == 2.5 and c.max_out == M for c in convs) and model.drop_rate == 0.25
    assert model.bcos_cfg['logit_temperature'] == 1.0 and model.bcos_cfg['logit_bias'] == pytest.approx(IMAGENET_BIAS)
    assert model.conv1.scale == pytest.approx(math.sqrt(6 * 49) / 100)  # v1's scale_fact for ResNets
    cifar = timm.create_model('bcos_simple_cifar.v1_cifar10_b2', widths=(8,) * 8, num_classes=3, scale=0.5)
    assert cifar.features[0].out_channels == 8 and cifar.num_classes == 3
    assert all(m.scale == 0.5 for m in cifar.modules() if isinstance(m, BcosConv2d))
    tag = 'simple_cifar.v1_cifar10_b2'
    _save_v1(tag, tmp_path / 'w.pth')
    with pytest.raises(V1StateDictError, match=r"not built like v1 checkpoint simple_cifar\.v1_cifar10_b2: b"):
        timm.create_model(f'bcos_{tag}', pretrained=True, b=1.5,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.pth')))
