"""Grid pointing game (paper §4, Fig. 5/6): grids, the localisation metric, methods, CLI, B ablation."""
import json
import warnings

import numpy as np
import pytest
import timm
import torch
from torch import nn

import timm_bcos  # noqa: F401  (registers the models)
from timm_bcos.data import TensorImageDataset, build_datasets
from timm_bcos.evaluation import (METHODS, POST_HOC, ablation_model_kwargs, attribute, b_ablation, default_smoothing,
                                  localisation, make_grids, occlusion, pointing_game, rank_by_confidence,
                                  run_evaluation)
from timm_bcos.explain import explain


pytestmark = pytest.mark.usefixtures('one_thread')


# --- grids -------------------------------------------------------------------------------------

class _TableModel(nn.Module):
    """Reads the image index from pixel (0, 0, 0) and returns that image's row of a logit table."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer('table', logits)

    def forward(self, x):
        i = (x[:, 0, 0, 0] * len(self.table)).long().clamp(0, len(self.table) - 1)
        return self.table[i]


def _table_setup(n=300, classes=10, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    images[:, 0, 0, 0] = (torch.arange(n) + 0.5) / n
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[:classes] = torch.arange(classes)
    logits = torch.randn(n, classes, generator=g)
    wrong = torch.rand(n, generator=g) < 0.2
    predicted = torch.where(wrong, (labels + 1) % classes, labels)
    logits[torch.arange(n), predicted] = 5 + 3 * torch.rand(n, generator=g)  # clearly the top class
    return TensorImageDataset(images, labels), _TableModel(logits), predicted == labels


@pytest.mark.parametrize('grid', [2, 3])
def test_grids_have_distinct_classes_and_exact_tiles(grid):
    data, model, correct = _table_setup()
    grids = make_grids(data, model, grid=grid, n_grids=12, seed=1)
    size = 6
    assert grids.images.shape == (12, 3, grid * size, grid * size)
    assert grids.labels.shape == grids.indices.shape == (12, grid * grid)
    for n in range(12):
        assert len(set(grids.labels[n].tolist())) == grid * grid  # distinct classes
        for t in range(grid * grid):
            r, c = divmod(t, grid)  # row-major tiles
            tile = grids.images[n, :, r * size:(r + 1) * size, c * size:(c + 1) * size]
            image, label = data[int(grids.indices[n, t])]
            assert torch.equal(tile, image)
            assert label == grids.labels[n, t]
    used = grids.indices.flatten()
    assert len(set(used.tolist())) == len(used)  # no image twice
    assert correct[used].all()  # only correctly classified images
    smoke = make_grids(data, None, grid=grid, n_grids=2, correct_only=False)  # no model: dataset order
    r, c = divmod(grid * grid - 1, grid)
    assert torch.equal(smoke.images[1, :, r * size:(r + 1) * size, c * size:(c + 1) * size],
                       data[int(smoke.indices[1, -1])][0])


def test_grids_take_the_most_confident_images_per_class_with_a_fixed_seed():
    data, model, correct = _table_setup()
    grids = make_grids(data, model, grid=3, n_grids=10, seed=3)
    probs = model.table.softmax(1)
    labels = data.labels
    for c in range(10):
        used = grids.indices[grids.labels == c]
        if not len(used):
            continue
        pool = torch.nonzero(correct & (labels == c)).flatten()
        top = pool[probs[pool, c].argsort(descending=True)][:len(used)]
        assert set(used.tolist()) == set(top.tolist())
        # in grid order, each class's confidence decreases
        assert (probs[used, c].diff() <= 0).all()
    again = make_grids(data, model, grid=3, n_grids=10, seed=3)
    other = make_grids(data, model, grid=3, n_grids=10, seed=4)
    assert torch.equal(again.images, grids.images) and torch.equal(again.labels, grids.labels)
    assert not torch.equal(other.labels, grids.labels)


def test_grids_stop_with_a_warning_when_classes_run_out():
    data, model, _ = _table_setup(n=60)
    with pytest.warns(UserWarning, match='could be built'):
        grids = make_grids(data, model, grid=3, n_grids=1000)
    assert 0 < len(grids) < 1000
    data, model, correct = _table_setup(n=300)
    with pytest.warns(UserWarning, match='could be built'):
        grids = make_grids(data, model, grid=3, n_grids=1000)  # until the classes run out
    used = grids.indices.flatten()
    assert correct[used].all() and len(set(used.tolist())) == len(used)
    assert len(used) > correct.sum() // 2
    ranking = rank_by_confidence(model, data)
    with pytest.raises(ValueError, match='classes'):
        make_grids(data, model, grid=3, n_grids=5, ranking=ranking, min_confidence=1.01)


# --- the metric --------------------------------------------------------------------------------

def _labels(n, grid, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(classes, generator=g)[:grid * grid] for _ in range(n)])


def test_default_smoothing_follows_the_paper():
    assert default_smoothing(32) == 3  # CIFAR-10
    assert default_smoothing(224) == 15  # ImageNet
    assert default_smoothing(8) == 1 and default_smoothing(16) == 3 and default_smoothing(64) == 5
    grid, tile = 2, 32
    a = torch.zeros(1, 4, grid * tile, grid * tile)
    a[0, 0, 0, tile] = 1.0  # a point just outside tile 0: the top row of its right neighbour's first column
    labels = _labels(1, grid)
    # the default (k=3 for 32 px tiles) spreads it over 2 x 3 pixels (the row above is padding), 2 of them in tile 0
    assert localisation(a, labels, grid)[0, 0] == pytest.approx(1 / 3)
    assert localisation(a, labels, grid, smooth=3)[0, 0] == pytest.approx(1 / 3)
    assert localisation(a, labels, grid, smooth=1)[0, 0] == 0
    # zero padding counts (v1): a corner point keeps 4 / 9 of its mass, an interior one all of it
    a = torch.zeros(1, 4, grid * tile, grid * tile)
    a[0, 0, 0, 0] = 1.0  # tile 0's corner
    a[0, 0, 5, tile + 5] = 1.0  # inside tile 1
    assert localisation(a, labels, grid, smooth=3)[0, 0] == pytest.approx(4 / 13)


@pytest.mark.parametrize('grid', [2, 3])
def test_oracle_scores_one_and_uniform_scores_one_over_tiles(grid):
    n, tile = 3, 8
    labels = _labels(n, grid)
    t = grid * grid
    g = torch.Generator().manual_seed(0)
    oracle = -torch.rand(n, t, grid * tile, grid * tile, generator=g)  # negative evidence everywhere...
    for j in range(t):
        r, c = divmod(j, grid)
        oracle[:, j, r * tile + 1:(r + 1) * tile - 1, c * tile + 1:(c + 1) * tile - 1] = torch.rand(
            n, tile - 2, tile - 2, generator=g)  # ...positive mass only inside the tile (1 px from its border)
    np.testing.assert_allclose(localisation(oracle, labels, grid, smooth=1), 1.0)
    np.testing.assert_allclose(localisation(oracle, labels, grid, smooth=3), 1.0)
    uniform = torch.ones(n, t, grid * tile, grid * tile)
    np.testing.assert_allclose(localisation(uniform, labels, grid, smooth=1), 1 / t)
    # positive part only: 3 units inside, 1 outside, any amount of negative mass
    a = torch.zeros(1, t, grid * tile, grid * tile)
    a[0, :, 0, 0] = 3.0  # tile 0
    a[0, :, -1, -1] = 1.0  # the last tile
    a[0, :, 0, 1] = -100.0
    s = localisation(a, labels[:1], grid, smooth=1)[0]
    assert s[0] == pytest.approx(0.75) and s[-1] == pytest.approx(0.25) and s[1:-1].max() == 0


def test_no_positive_mass_scores_zero():
    labels = _labels(2, 2)
    assert (localisation(-torch.rand(2, 4, 16, 16), labels, 2) == 0).all()
    assert (localisation(torch.zeros(2, 4, 16, 16), labels, 2) == 0).all()


def _permute_tiles(a, grid, perm):
    """New tile p holds old tile perm[p] (for (..., H, W) maps)."""
    h, w = a.shape[-2] // grid, a.shape[-1] // grid
    blocks = [a[..., (q // grid) * h:(q // grid + 1) * h, (q % grid) * w:(q % grid + 1) * w] for q in perm]
    rows = [torch.cat(blocks[r * grid:(r + 1) * grid], -1) for r in range(grid)]
    return torch.cat(rows, -2)


@pytest.mark.parametrize('grid', [2, 3])
def test_score_is_invariant_to_the_order_of_tiles(grid):
    n, t, tile = 4, grid * grid, 8
    labels = _labels(n, grid)
    a = torch.randn(n, t, grid * tile, grid * tile, generator=torch.Generator().manual_seed(1))
    scores = localisation(a, labels, grid, smooth=1)
    assert scores.std() > 0.01  # not a trivial map
    for seed in range(3):
        perm = torch.randperm(t, generator=torch.Generator().manual_seed(seed)).tolist()
        a2 = _permute_tiles(a, grid, perm)[:, perm]  # move the tiles, and reorder the maps by tile
        np.testing.assert_allclose(localisation(a2, labels[:, perm], grid, smooth=1), scores[:, perm], rtol=1e-12)
        # explaining the same classes in another column order changes nothing either
        inverse = np.argsort(perm).tolist()
        np.testing.assert_allclose(localisation(a2[:, inverse], labels[:, perm], grid, smooth=1, targets=labels),
                                   scores, rtol=1e-12)
    # with smoothing: exact when no mass sits within k // 2 of a tile border (nothing crosses tiles)
    border = torch.ones(tile, tile, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    mask = border.repeat(grid, grid)
    a[..., mask] = 0
    scores = localisation(a, labels, grid, smooth=3)
    a2 = _permute_tiles(a, grid, perm)[:, perm]
    np.testing.assert_allclose(localisation(a2, labels[:, perm], grid, smooth=3), scores[:, perm], rtol=1e-12)


def test_localisation_checks_its_inputs():
    labels = _labels(1, 2)
    with pytest.raises(ValueError, match='exactly one tile'):
        localisation(torch.rand(1, 1, 8, 8), labels, 2, targets=torch.tensor([[99]]))
    with pytest.raises(ValueError, match='odd'):
        localisation(torch.rand(1, 4, 8, 8), labels, 2, smooth=2)
    with pytest.raises(ValueError, match='labels'):
        localisation(torch.rand(1, 4, 8, 8), labels, 3)


# --- methods on tiny models --------------------------------------------------------------------

@pytest.fixture(scope='module')
def digits16():
    return build_datasets('digits', 16, augment=False)


@pytest.fixture(scope='module')
def tiny_models():
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    return {'bcos': timm.create_model('bcos_simple_cifar_tiny', num_classes=10).eval(),
            'baseline': timm.create_model('baseline_simple_cifar_tiny', num_classes=10).eval()}


@pytest.mark.parametrize('kind', ['bcos', 'baseline'])
def test_every_method_runs_on_tiny_models(kind, tiny_models, digits16):
    model = tiny_models[kind]
    grids = make_grids(digits16.test, model, grid=3, n_grids=2, correct_only=False)  # an untrained model
    assert grids.images.shape == (2, 3, 48, 48)
    methods = METHODS if kind == 'bcos' else POST_HOC
    game = pointing_game(model, grids=grids, methods=methods, ig_steps=2, keep_maps=2, progress=False)
    assert tuple(game.keys()) == methods
    for m in methods:
        assert game[m].shape == (2, 9)
        assert game.maps[m].shape == (2, 9, 48, 48)
        assert torch.isfinite(game.maps[m]).all() and game.maps[m].abs().sum() > 0
        np.testing.assert_allclose(localisation(game.maps[m], grids.labels, 3, smooth=game.smooth[m]), game[m])
    assert game.smooth['occlusion'] == 1 and game.smooth['grad'] == default_smoothing(16) == 3
    assert game.settings['gradcam_layer'] == 'features'
    summary = game.summary()
    assert summary['gradcam']['n'] == 18 and summary['gradcam']['mean'] == pytest.approx(game['gradcam'].mean())
    assert summary['gradcam']['median'] == pytest.approx(np.median(game['gradcam']))
    if kind == 'baseline':
        with pytest.raises(ValueError, match='B-cos model'):
            pointing_game(model, grids=grids, methods=('bcos',), progress=False)


def test_bcos_method_is_the_explanation_contributions(tiny_models, digits16):
    model = tiny_models['bcos']
    grids = make_grids(digits16.test, model, grid=2, n_grids=3, correct_only=False)
    game = pointing_game(model, grids=grids, methods=('bcos',), keep_maps=3, batch_size=8, progress=False)
    e = explain(model, grids.images, target=grids.labels)
    torch.testing.assert_close(game.maps['bcos'], e.contributions.float())
    np.testing.assert_allclose(game['bcos'], localisation(game.maps['bcos'], grids.labels, 2))
    # (chunks of 2 grids vs. all 3 at once: float32 convolutions differ in the last bits)
    np.testing.assert_allclose(game['bcos'], localisation(e.contributions, grids.labels, 2), rtol=1e-4)
    assert game.eq13_error < 1e-4  # the explanations are exact (Eq. 13)


def test_posthoc_methods_match_captum(tiny_models):
    from captum.attr import InputXGradient, Occlusion, Saliency

    model = tiny_models['baseline']
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[3, 5], [1, 0]])
    for j in range(2):
        xs = x.clone().requires_grad_(True)
        grad = Saliency(model).attribute(xs, target=targets[:, j], abs=False).sum(1)
        ixg = InputXGradient(model).attribute(x.clone().requires_grad_(True), target=targets[:, j]).sum(1)
        occ = Occlusion(model).attribute(x, target=targets[:, j], sliding_window_shapes=(3, 6, 6), strides=(3, 4, 4),
                                         baselines=0.0).sum(1)
        torch.testing.assert_close(attribute(model, 'grad', x, targets)[:, j], grad)
        torch.testing.assert_close(attribute(model, 'ixg', x, targets)[:, j], ixg)
        torch.testing.assert_close(occlusion(model, x, targets, 6, 4)[:, j], occ, rtol=1e-4, atol=1e-6)


def test_bcos_models_get_the_encoded_input(tiny_models):
    model = tiny_models['bcos']
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x6 = torch.cat([x, 1 - x], 1).requires_grad_(True)
    (g,) = torch.autograd.grad(model(x6)[0, 4], x6)
    torch.testing.assert_close(attribute(model, 'grad', x, torch.tensor([[4]]))[0, 0], g.sum(1)[0])
    torch.testing.assert_close(attribute(model, 'ixg', x, torch.tensor([[4]]))[0, 0], (g * x6).sum(1)[0].detach())


# --- command line ------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained_8px(tmp_path_factory):
    """A B-cos net and a baseline trained for a few seconds on 8 px digits (local-dir: folders)."""
    from timm_bcos.training import TrainConfig, train

    root = tmp_path_factory.mktemp('trained')
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures run before the function-scoped one)
    for name, loss in (('bcos_simple_cifar_tiny', 'bce'), ('baseline_simple_cifar_tiny', 'ce')):
        out = root / name
        train(TrainConfig(model=name, data='digits', img_size=8, epochs=3, batch_size=64, lr=1e-3,
                          lr_base_batch=None, schedule='constant', loss=loss, output=str(out), progress=False,
                          cpu=True))
        runs[loss] = f'local-dir:{out}'
    torch.set_num_threads(threads)
    return runs


def test_cli_runs_end_to_end_on_digits(trained_8px, tmp_path, capsys):
    from timm_bcos.cli import main

    out = tmp_path / 'eval'
    main(['evaluate', '--model', trained_8px['bce'], '--baseline', trained_8px['ce'], '--data', 'digits',
          '--grid', '2', '--n', '3', '--out', str(out), '--ig-steps', '2', '--examples', '2', '--no-progress',
          '--limit', 'occlusion=2'])
    results = json.loads((out / 'results.json').read_text())
    assert set(results['models']) == {'bcos', 'baseline'}
    assert set(results['models']['bcos']['methods']) == set(METHODS)
    assert set(results['models']['baseline']['methods']) == set(POST_HOC)
    for r in results['models'].values():
        assert r['accuracy'] > 0.5 and r['n_grids'] == 3
        for m, st in r['methods'].items():
            assert st['n'] == (2 if m == 'occlusion' else 3) * 4
    for key in ('bcos', 'baseline'):  # the summaries are of the saved scores
        for m, st in results['models'][key]['methods'].items():
            s = np.load(out / 'scores.npz')[f'{key}/{m}']
            assert (st['mean'], st['median'], st['q25'], st['q75']) == pytest.approx(
                (s.mean(), *np.percentile(s, [50, 25, 75])))
    assert results['settings']['img_size'] == 8 and results['settings']['smooth'] == 1
    assert 'eq13_error' in results['models']['bcos'] and 'eq13_error' not in results['models']['baseline']
    scores = np.load(out / 'scores.npz')
    assert scores['bcos/bcos'].shape == (3, 4) and scores['baseline/occlusion'].shape == (2, 4)
    np.testing.assert_allclose(scores['bcos/bcos'].mean(), results['models']['bcos']['methods']['bcos']['mean'])
    for png in ('boxplot.png', 'examples_bcos.png', 'examples_baseline.png', 'examples_bcos_tiles.png'):
        assert (out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    md = (out / 'results.md').read_text()
    assert 'B-cos (Eq. 15)' in md and 'DeepLIFT' in md
    assert 'results.md' in capsys.readouterr().out


def test_cli_rejects_bad_limits(tmp_path):
    from timm_bcos.evaluation import main

    with pytest.raises(SystemExit):
        main(['--out', str(tmp_path), '--limit', 'lime=3'])


# --- the B ablation ----------------------------------------------------------------------------

def test_ablation_settings_are_v1s():
    kw = ablation_model_kwargs(2.0)
    assert kw == dict(b=2.0, max_out=2, scale=pytest.approx(10 ** -1.25), logit_temperature=100.0)
    assert ablation_model_kwargs(1.0)['logit_temperature'] == pytest.approx(1e-3)
    assert ablation_model_kwargs(2.5, max_out=1)['scale'] == pytest.approx(0.01)
    with pytest.raises(ValueError):
        ablation_model_kwargs(3.0)


def test_ablation_trains_evaluates_and_skips_finished_runs(tmp_path, monkeypatch):
    import timm_bcos.evaluation.ablation
    import timm_bcos.training
    from timm_bcos.evaluation import b_ablation

    kwargs = dict(bs=(2.0,), plain=True, img_size=8, epochs=2, batch_size=64, lr=1e-3, grid=2, n_grids=4,
                  progress=False, runs_dir=tmp_path / 'runs')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # a barely trained net may classify too few classes for a grid
        first = b_ablation(tmp_path / 'out', 'digits', **kwargs)
    assert [r['name'] for r in first['runs']] == ['B2.00-plain', 'B2.00-M2']
    saved = np.load(tmp_path / 'out' / 'scores.npz')
    assert all(r['n_grids'] == 4 and r['localisation']['mean'] == pytest.approx(saved[r['name']].mean())
               for r in first['runs'])
    assert all('eq13_error' in r for r in first['runs'])
    for png in ('ablation.png',):
        assert (tmp_path / 'out' / png).read_bytes()[:4] == b'\x89PNG'
    assert (tmp_path / 'runs' / 'B2.00-M2' / 'localisation_2x2.json').exists()

    def no_training(config):
        raise AssertionError(f'retrained {config.output}')

    def no_evaluation(*args, **kwargs):
        raise AssertionError('evaluated again')

    monkeypatch.setattr(timm_bcos.training, 'train', no_training)
    monkeypatch.setattr(timm_bcos.evaluation.ablation, 'pointing_game', no_evaluation)  # the cached scores are used
    second = b_ablation(tmp_path / 'out2', 'digits', **kwargs)
    assert [r['accuracy'] for r in second['runs']] == [r['accuracy'] for r in first['runs']]
    assert [r['localisation'] for r in second['runs']] == [r['localisation'] for r in first['runs']]
    with pytest.raises(RuntimeError, match='another config'):
        b_ablation(tmp_path / 'out3', 'digits', **dict(kwargs, epochs=3))


def test_evaluate_refuses_a_folder_of_the_users_files_before_any_work(tmp_path):
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(timm_bcos.OutputFolderError, match='not written by timm-bcos'):
        run_evaluation('no-such-model', data='digits', out=tmp_path)  # refused before the model is even loaded
    with pytest.raises(timm_bcos.OutputFolderError, match='not written by timm-bcos'):
        b_ablation(tmp_path, data='digits')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.txt']
