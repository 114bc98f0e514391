"""timm_bcos.training: accelerate training, exact resume, atomic checkpoints, multi-process, export."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import timm_bcos
from timm_bcos.data import SeededSampler, TensorImageDataset, build_datasets, load_fashion_mnist
from timm_bcos.training import CheckpointError, TrainConfig, loss_function, lr_factor, main, train

WIDTHS = (8, 8, 16, 16, 16, 32, 32, 32)
SUBSET = 512  # 8 steps of 64 per epoch
STEPS_PER_EPOCH = SUBSET // 64


def _cfg(out, **kw):
    base = dict(model='bcos_simple_cifar', model_kwargs=dict(widths=WIDTHS), data='digits', img_size=16,
                train_subset=SUBSET, epochs=2, batch_size=64, lr=4e-3, lr_base_batch=None, schedule='cosine',
                seed=0, output=str(out), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_state():
    """accelerate keeps a process-wide state; each test trains as if in a fresh process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; avoids thread oversubscription on a shared 2-core machine
    _reset_accelerate()
    yield
    _reset_accelerate()
    torch.set_num_threads(threads)


def _weights(folder):
    return load_file(str(Path(folder) / 'model.safetensors'))


def _digits_test_set(size=16):
    x_train, y_train, x_test, y_test = timm_bcos.data.load_digits(size)
    return timm_bcos.AddInverse()(x_test), y_test


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """One finished 2-epoch run, shared by the read-only tests (copy it before changing it)."""
    _reset_accelerate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests: bitwise comparisons need the same thread count
    out = tmp_path_factory.mktemp('run') / 'out'
    results = train(_cfg(out))
    torch.set_num_threads(threads)
    _reset_accelerate()
    return out, results


# --- training --------------------------------------------------------------------------------

def test_training_reduces_the_loss(finished_run):
    out, results = finished_run
    x, y = _digits_test_set()
    torch.manual_seed(0)
    from accelerate.utils import set_seed
    set_seed(0)
    untrained = timm.create_model('bcos_simple_cifar', num_classes=10, widths=WIDTHS).eval()
    with torch.no_grad():
        initial = F.binary_cross_entropy_with_logits(untrained(x), F.one_hot(y, 10).float()).item()
    history = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in history] == [1, 2] and [r['step'] for r in history] == [8, 16]
    assert results['test_loss'] < 0.9 * initial, (initial, results)
    assert history[1]['train_loss'] < history[0]['train_loss']
    assert results['test_images'] == len(y) == 297
    assert results['finished'] and results['epochs_completed'] == 2 and results['processes_in_sync']
    for key in ('train_loss', 'train_acc', 'test_loss', 'test_acc', 'images_per_s', 'lr', 'seconds'):
        assert key in history[0]


def test_schedules_and_lr_scaling():
    cfg = TrainConfig(batch_size=64, gradient_accumulation_steps=2, schedule='step', epochs=10)
    assert cfg.effective_lr == pytest.approx(2.5e-4 * 128 / 256)
    assert TrainConfig(lr=1e-3, lr_base_batch=None, batch_size=64).effective_lr == 1e-3
    assert [lr_factor(s, 100, 10, cfg) for s in (0, 59, 60, 99)] == [1.0, 1.0, 0.1, 0.1]
    cos = TrainConfig(schedule='cosine', warmup_epochs=1)
    assert lr_factor(0, 100, 10, cos) == pytest.approx(0.1) and lr_factor(9, 100, 10, cos) == 1.0
    assert lr_factor(10, 100, 10, cos) == 1.0 and lr_factor(55, 100, 10, cos) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, cos) < 0.001
    with pytest.raises(ValueError, match='schedule'):
        TrainConfig(schedule='linear')
    with pytest.raises(ValueError, match='off_label'):
        TrainConfig(loss='ce', off_label=True)


def test_bce_off_label_and_ce_losses():
    logits, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 4])
    one_hot = F.one_hot(y, 5).float()
    assert torch.allclose(loss_function(TrainConfig())(logits, y).mean(),
                          F.binary_cross_entropy_with_logits(logits, one_hot))
    assert torch.allclose(loss_function(TrainConfig(off_label=True))(logits, y).mean(),
                          F.binary_cross_entropy_with_logits(logits, one_hot.clamp(min=0.2)))
    assert torch.allclose(loss_function(TrainConfig(loss='ce'))(logits, y).mean(), F.cross_entropy(logits, y))


# --- data ------------------------------------------------------------------------------------

def test_sampler_depends_only_on_seed_and_epoch():
    a, b = SeededSampler(100, seed=3), SeededSampler(100, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert sorted(i for i, _ in a) == list(range(100))
    assert a.keys(epoch=2) != list(a) and SeededSampler(100, seed=4).keys(1) != list(a)
    assert list(SeededSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
    images = torch.rand(4, 1, 16, 16)
    ds = TensorImageDataset(images, torch.arange(4), pad=2, flip=True)
    assert torch.equal(ds[(1, 123)][0], ds[(1, 123)][0]) and ds[(1, 123)][0].shape == (3, 16, 16)
    assert torch.equal(ds[1][0], images[1].expand(3, -1, -1))  # no seed: no augmentation
    assert any(not torch.equal(ds[(1, s)][0], ds[1][0]) for s in range(5))


def test_image_folder_training(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(('cat', 'dog')):
        (tmp_path / 'imgs' / name).mkdir(parents=True)
        for i in range(6):
            arr = (torch.rand(20, 24, 3, generator=g) * 120 + 120 * c).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / 'imgs' / name / f'{i}.png')
    data = build_datasets(str(tmp_path / 'imgs'), 16, auto_augment='rand-m9-mstd0.5')
    assert data.classes == ['cat', 'dog'] and len(data.train) == 10 and len(data.test) == 2
    x, label = data.train[(3, 99)]
    assert x.shape == (3, 16, 16) and 0 <= x.min() and x.max() <= 1
    # timm's random transforms (python, numpy and torch RNGs) are seeded per sample; the global
    # random states are left as they were
    first = [data.train[(i, 99 + i)][0] for i in range(10)]
    torch.rand(3), np.random.rand(3), random.random()
    state = torch.get_rng_state()
    again = [data.train[(i, 99 + i)][0] for i in range(10)]
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    results = train(_cfg(tmp_path / 'out', data=str(tmp_path / 'imgs'), train_subset=None, batch_size=4,
                         max_steps=2, auto_augment='rand-m9-mstd0.5'))
    assert results['step'] == 2 and results['test_images'] == 2
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['label_names'] == ['cat', 'dog'] and config['num_classes'] == 2


def test_fashion_mnist_loader(fashion_mnist):
    x_train, y_train, x_test, y_test = load_fashion_mnist(32)
    assert x_train.shape == (60000, 1, 32, 32) and x_test.shape == (10000, 1, 32, 32)
    assert x_train.dtype == torch.uint8 and int(x_train.max()) == 255
    assert torch.equal(torch.bincount(y_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(y_test), torch.full((10,), 1000))
    data = build_datasets('fashion-mnist', 32)
    assert data.classes[0] == 'T-shirt/top' and data.classes[9] == 'Ankle boot'
    x, label = data.train[(0, 7)]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert label == int(y_train[0]) and torch.equal(x[0], x[2])


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv('TIMM_BCOS_FASHION_MNIST', str(tmp_path))
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        load_fashion_mnist(32)


# --- resume and checkpoints ------------------------------------------------------------------

def test_kill_and_resume_equals_uninterrupted_run(tmp_path, finished_run, monkeypatch):
    import timm_bcos.training.checkpoint as checkpoint_mod

    uninterrupted, _ = finished_run
    out = tmp_path / 'out'
    # 1st run stops after epoch 1 (its checkpoint is written)
    first = train(_cfg(out, max_steps=STEPS_PER_EPOCH))
    assert first['epochs_completed'] == 1 and not first['finished']
    assert json.loads((out / 'checkpoint' / 'trainer_state.json').read_text())['epoch'] == 1
    # 2nd run trains epoch 2 and is killed while replacing the checkpoint
    _reset_accelerate()

    def killed(src, dst):
        raise KeyboardInterrupt('killed')

    monkeypatch.setattr(checkpoint_mod, 'atomic_replace', killed)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(out, resume=True))
    monkeypatch.undo()
    assert (out / 'checkpoint.tmp' / 'trainer_state.json').exists()  # epoch 2, never put in place
    assert json.loads((out / 'checkpoint' / 'trainer_state.json').read_text())['epoch'] == 1
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 2  # epoch 2's line, not checkpointed
    # 3rd run resumes from epoch 1 again and finishes
    _reset_accelerate()
    results = train(_cfg(out, resume=True))
    assert results['finished'] and results['step'] == 2 * STEPS_PER_EPOCH
    assert not (out / 'checkpoint.tmp').exists()
    a, b = _weights(uninterrupted), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = [json.loads(x) for x in (uninterrupted / 'metrics.jsonl').read_text().splitlines()]
    rows_b = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows_b] == [1, 2]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: ra[k] for k in ('train_loss', 'train_acc', 'test_loss', 'lr', 'step')} == \
               {k: rb[k] for k in ('train_loss', 'train_acc', 'test_loss', 'lr', 'step')}
    # resuming a finished run re-exports the model and changes nothing
    _reset_accelerate()
    again = train(_cfg(out, resume=True))
    assert again['weights_sha256'] == results['weights_sha256']


def test_crash_between_renames_keeps_a_checkpoint(tmp_path, finished_run):
    from timm_bcos.training.checkpoint import recover_checkpoint

    out = tmp_path / 'out'
    shutil.copytree(finished_run[0], out)
    os.replace(out / 'checkpoint', out / 'checkpoint.old')  # first rename done, second not
    (out / 'checkpoint.tmp').mkdir()
    recover_checkpoint(out)
    assert (out / 'checkpoint' / 'trainer_state.json').exists()
    assert not (out / 'checkpoint.old').exists() and not (out / 'checkpoint.tmp').exists()


def _garbage(path):
    path.write_bytes(b'\x00garbage' * 10)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _other_model_weights(path):
    model = timm.create_model('bcos_simple_cifar', num_classes=10, widths=(8,) * 8)
    save_file(model.state_dict(), str(path))


@pytest.mark.parametrize('name, damage, match', [
    ('model.safetensors', _garbage, r'model\.safetensors: corrupt'),
    ('model.safetensors', _truncate, r'model\.safetensors: corrupt'),
    ('model.safetensors', _other_model_weights, r'model\.safetensors: weights do not fit'),
    ('optimizer.bin', _truncate, r'optimizer\.bin: corrupt'),
    ('scheduler.bin', os.remove, r'scheduler\.bin: missing'),
    ('random_states_0.pkl', _garbage, r'random_states_0\.pkl: corrupt'),
    ('trainer_state.json', lambda p: p.write_text('{"epoch": 1,'), r'trainer_state\.json: corrupt'),
])
def test_corrupt_checkpoint_names_the_file(tmp_path, finished_run, name, damage, match):
    out = tmp_path / 'out'
    shutil.copytree(finished_run[0], out)
    damage(out / 'checkpoint' / name)
    with pytest.raises(CheckpointError, match=match):
        train(_cfg(out, resume=True))


def test_incompatible_checkpoint_and_occupied_output(tmp_path, finished_run):
    out = tmp_path / 'out'
    shutil.copytree(finished_run[0], out)
    with pytest.raises(CheckpointError, match=r'trainer_state\.json: .*another configuration.*lr: checkpoint 0\.004'):
        train(_cfg(out, resume=True, lr=1e-3))
    _reset_accelerate()
    with pytest.raises(FileExistsError, match='resume=True'):
        train(_cfg(out))


@pytest.mark.parametrize('flags', [{}, dict(overwrite=True), dict(resume=True)])
def test_a_folder_of_the_users_files_is_never_used(tmp_path, flags):
    out = tmp_path / 'mine'
    out.mkdir()
    (out / 'config.json').write_text('{"mine": 1}')
    (out / 'results.json').write_text('{"mine": 2}')
    with pytest.raises(timm_bcos.OutputFolderError, match='not written by timm-bcos'):
        train(_cfg(out, **flags))
    assert sorted(os.listdir(out)) == ['config.json', 'results.json']
    assert json.loads((out / 'config.json').read_text()) == {'mine': 1}


def test_a_run_folder_in_use_is_locked(tmp_path, finished_run):
    """A second run into the folder of a running one refuses, naming the lock and the process;
    the lock goes with its process, even a killed one."""
    out = tmp_path / 'out'
    shutil.copytree(finished_run[0], out)
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time; from pathlib import Path; '
         'from timm_bcos.training.run_folder import RunLock; RunLock(Path(sys.argv[1])); print("locked", flush=True); '
         'time.sleep(120)', str(out / 'run.lock')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        metrics = (out / 'metrics.jsonl').read_text()
        for flags in (dict(resume=True), dict(overwrite=True)):
            with pytest.raises(timm_bcos.OutputFolderError,
                               match=rf'in use by another training run \(process {holder.pid} on .*run\.lock'):
                train(_cfg(out, **flags))
            _reset_accelerate()
        assert (out / 'metrics.jsonl').read_text() == metrics and (out / 'checkpoint').is_dir()
    finally:
        holder.kill()
        holder.wait()
    results = train(_cfg(out, resume=True))  # the killed holder's lock is gone
    assert results['epochs_completed'] == 2


# --- export ----------------------------------------------------------------------------------

def test_final_folder_loads_with_timm_local_dir(finished_run):
    out, results = finished_run
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    reference = timm.create_model('bcos_simple_cifar', num_classes=10, widths=WIDTHS).eval()
    reference.load_state_dict(load_file(str(out / 'checkpoint' / 'model.safetensors')))  # the last epoch's weights
    x, y = _digits_test_set()
    with torch.no_grad():
        logits = loaded(x)
        assert torch.equal(logits, reference(x))
    assert (logits.argmax(1) == y).float().mean().item() == pytest.approx(results['test_acc'], abs=1.5 / len(y))
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'bcos_simple_cifar' and config['model_args']['widths'] == list(WIDTHS)
    assert config['pretrained_cfg']['input_size'] == [6, 16, 16] and config['label_names'][3] == '3'
    from PIL import Image
    image = Image.fromarray((x[0, :3].permute(1, 2, 0).numpy() * 255).astype('uint8'))
    assert timm_bcos.create_transform(loaded)(image).shape == (6, 16, 16)
    saved = json.loads((out / 'results.json').read_text())
    assert saved['metrics']['test_acc'] == results['test_acc'] and saved['config']['lr'] == 4e-3
    assert saved['recipe']['optimizer'] == 'Adam' and len(saved['history']) == 2
    assert saved['environment']['timm_bcos'] == timm_bcos.__version__  # the code that ran, installed or not


def test_conventional_baseline_with_cross_entropy(tmp_path):
    out = tmp_path / 'out'
    results = train(_cfg(out, model='resnet10t', model_kwargs={}, loss='ce', max_steps=3, lr=1e-3))
    assert results['step'] == 3 and results['test_images'] == 297
    config = json.loads((out / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [3, 16, 16] and config['pretrained_cfg']['mean'] == [0, 0, 0]
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.rand(2, 3, 16, 16)
    reference = timm.create_model('resnet10t', num_classes=10).eval()
    reference.load_state_dict(_weights(out))
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


def test_bcosify_a_trained_model_and_fine_tune(tmp_path):
    """A conventional model trained here, loaded back through timm's local-dir: path, B-cosified
    (its config.json says it took unnormalised images) and fine-tuned with B ramped from 1 to 2."""
    source = tmp_path / 'conventional'
    train(_cfg(source, model='resnet10t', model_kwargs={}, loss='ce', max_steps=3, lr=1e-3))
    _reset_accelerate()
    out = tmp_path / 'bcosified'
    seen = []
    real_set_b = timm_bcos.training.loop.set_b

    def recording_set_b(model, b):
        seen.append(b)
        real_set_b(model, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timm_bcos.training.loop, 'set_b', recording_set_b)
        results = train(_cfg(out, model=f'local-dir:{source}', pretrained=True, model_kwargs={}, bcosify={},
                             b_warmup_epochs=1, epochs=2, lr=1e-3))
    assert seen[0] == 1.0 and seen[STEPS_PER_EPOCH] == 2.0 and seen[STEPS_PER_EPOCH // 2] == 1.5
    assert results['step'] == 2 * STEPS_PER_EPOCH and results['test_images'] == 297
    config = json.loads((out / 'results.json').read_text())
    assert config['data']['in_chans'] == 6 and config['config']['bcosify'] == {}
    with pytest.raises(ValueError, match='b_warmup_epochs'):
        TrainConfig(b_warmup_epochs=1)  # a ramp needs a B-cosified model
    # the fine-tuned model loads back through timm (as the generic `bcosified`: resnet10t is no paper architecture)
    assert json.loads((out / 'config.json').read_text())['architecture'] == 'bcosified'
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.bcos_cfg['b'] == 2.0 and loaded.bcos_cfg['bcosified']['architecture'] == 'resnet10t'
    reference = timm.create_model('bcosified', base_model='resnet10t', num_classes=10,
                                  bcosify=timm_bcos.convert.bcosify_args(loaded)).eval()
    reference.load_state_dict(_weights(out))
    x = timm_bcos.add_inverse(torch.rand(2, 3, 16, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x)) and loaded(x).abs().max() > 0
    assert loaded.check_dynamic_linearity(x) < 1e-4


def test_bcosify_recipe_defaults(tmp_path):
    """--bcosify makes B-cosification's fine-tuning recipe the default; options and recipes still win."""
    from timm_bcos.training import BCOSIFY_RECIPE
    from timm_bcos.training.cli import parse_config

    base = ['--model', 'resnet10t', '--output', str(tmp_path / 'o')]
    plain = parse_config(base)
    assert (plain.lr, plain.schedule, plain.off_label, plain.bcosify) == (2.5e-4, 'step', False, None)
    tuned = parse_config(base + ['--bcosify'])
    assert tuned.bcosify == {} and {k: getattr(tuned, k) for k in BCOSIFY_RECIPE} == BCOSIFY_RECIPE
    mine = parse_config(base + ['--bcosify', 'activations=remove', '--lr', '1e-3', '--off-label', 'false'])
    assert (mine.lr, mine.schedule, mine.off_label, mine.bcosify) == (1e-3, 'cosine', False, {'activations': 'remove'})
    recipe = tmp_path / 'recipe.json'
    recipe.write_text(json.dumps(dict(bcosify={'norm': 'none'}, schedule='step')))
    from_recipe = parse_config(['--config', str(recipe)] + base)
    assert (from_recipe.lr, from_recipe.schedule, from_recipe.bcosify) == (1e-4, 'step', {'norm': 'none'})


def test_cli(tmp_path, capsys):
    out = tmp_path / 'out'
    results = main(['--data', 'digits', '--img-size', '16', '--model-kwargs', 'widths=[8,8,16,16,16,32,32,32]',
                    '--train-subset', '128', '--batch-size', '32', '--lr', '1e-3', '--lr-base-batch', '0',
                    '--schedule', 'cosine', '--warmup-epochs', '0.5', '--off-label', '--grad-clip', '1.0',
                    '--grad-accum', '2', '--max-steps', '1', '--no-progress', '--output', str(out)])
    assert results['step'] == 1 and 'test accuracy' in capsys.readouterr().out
    saved = json.loads((out / 'results.json').read_text())['config']
    assert saved['off_label'] is True and saved['gradient_accumulation_steps'] == 2 and saved['lr_base_batch'] is None
    _reset_accelerate()
    with pytest.raises(SystemExit, match='previous run'):
        main(['--data', 'digits', '--output', str(out)])
    with pytest.raises(SystemExit, match='lr'):
        main(['--lr', '-1', '--output', str(tmp_path / 'new')])
    # a run's config is a recipe: the same settings, command-line options win; via `timm-bcos train`
    _reset_accelerate()
    from timm_bcos.cli import main as cli
    cli(['train', '--config', str(out / 'results.json'), '--output', str(tmp_path / 'again'), '--seed', '3'])
    again = json.loads((tmp_path / 'again' / 'results.json').read_text())['config']
    assert again == {**saved, 'output': str(tmp_path / 'again'), 'seed': 3}
    (tmp_path / 'bad.json').write_text('{"epochz": 3}')
    with pytest.raises(SystemExit, match='epochz'):
        main(['--config', str(tmp_path / 'bad.json'), '--output', str(tmp_path / 'x')])


# --- several processes -----------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo), same global batch of 64.

    Each process takes 32 images of every global batch and DDP averages the gradients, so each
    update equals the one-process update up to float32 summation order (~1e-8). Adam normalises
    updates (m / sqrt(v)), so rounding differences are not damped; at lr 4e-3 in the first, chaotic
    steps of a B-cos net they grow to ~5e-3 relative after 16 steps (measured), at lr 1e-4 they stay
    ~1e-7 (measured 4e-8). Hence lr 1e-4 and a 1e-5 tolerance: wrong batches or unsynchronised
    gradients move weights by ~lr per step (~1e-3 relative), 100x above it. Both processes end
    bitwise equal (sha256 of the weights gathered from each process).
    """
    args = ['--data', 'digits', '--img-size', '16', '--model-kwargs', json.dumps(dict(widths=WIDTHS)),
            '--train-subset', str(SUBSET), '--epochs', '2', '--batch-size', '64', '--lr', '1e-4',
            '--lr-base-batch', '0', '--schedule', 'cosine', '--no-progress']
    one, two = tmp_path / 'one', tmp_path / 'two'
    main(args + ['--output', str(one)])
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '-m', 'timm_bcos.training',
           *args, '--output', str(two)]
    env = dict(os.environ, OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1')
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r1 = json.loads((one / 'results.json').read_text())['metrics']
    r2 = json.loads((two / 'results.json').read_text())['metrics']
    assert r1['num_processes'] == 1 and r2['num_processes'] == 2 and r2['processes_in_sync']
    assert r2['test_images'] == r1['test_images'] == 297  # 297 = odd: padding duplicates are dropped
    assert r2['step'] == r1['step'] == 2 * STEPS_PER_EPOCH
    a, b = _weights(one), _weights(two)
    for k in a:
        diff = (a[k] - b[k]).norm() / a[k].norm()
        assert diff < 1e-5 and (a[k] - b[k]).abs().max() < 1e-5, (k, diff)
    for key in ('train_loss', 'test_loss'):
        assert r2[key] == pytest.approx(r1[key], rel=1e-5)
    assert r2['train_acc'] == r1['train_acc'] and r2['test_acc'] == r1['test_acc']


def test_run_config_describes_the_run_and_fits_timms_pipeline(tmp_path):
    """A run of bcos_simple_cifar_tiny (whose default tag is the shipped Fashion-MNIST model) on
    digits: its config.json and card describe that run; timm's own transform reads its config."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from timm_bcos.hub import publish

    out = tmp_path / 'run'
    train(_cfg(out, model='bcos_simple_cifar_tiny', model_kwargs={}, epochs=1, max_steps=2))
    cfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert cfg.get('tag') != 'fashion_mnist' and 'license' not in cfg and 'digits' in cfg['description']
    assert cfg['mean'] == [0.0] * 3 and cfg['std'] == [1.0] * 3 and cfg['label_names'] == [str(i) for i in range(10)]
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    image = create_transform(**resolve_data_config(model=loaded))(Image.new('RGB', (20, 20)))
    assert image.shape == (3, 16, 16)  # timm's pipeline; timm_bcos.create_transform adds the encoding
    card = Path(publish(str(out), 'testorg/digits', dry_run=True, out_dir=str(tmp_path / 'card'), weights=False))
    published = json.loads((card / 'config.json').read_text())['pretrained_cfg']
    assert published['mean'] == [0.0] * 3 and 'digits' in published['description']
    digits = timm_bcos.data.example_images(timm_bcos.data.DIGITS_CLASSES, tmp_path)
    timm_bcos.explain(loaded.eval(), timm_bcos.load_images(loaded, digits), k=2).save(tmp_path / 'digits.png')
    assert (card / 'explanation.png').read_bytes() == (tmp_path / 'digits.png').read_bytes()  # digits, not clothes
