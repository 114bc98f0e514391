"""Training with `accelerate`: the same code on 1 CPU, 1 GPU, N GPUs or N nodes.

    timm-bcos train --model bcos_simple_cifar_tiny --data fashion-mnist --output out/fmnist
    accelerate launch -m timm_bcos.train --model bcos_resnet18 --data /data/imagenette --output out/r18
    accelerate launch --multi_gpu --num_processes 2 -m timm_bcos.train ...   # 2 CPU processes (gloo)

Recipe (paper §5): Adam, no weight decay, lr 2.5e-4 at batch 256 (scaled linearly with the
effective batch, `lr_base_batch`), lr x0.1 after 60% of training (``schedule='step'``) or cosine
with warm-up ("training+"), BCE on sigmoid(logits) against one-hot targets (Eq. 16; B-cos models
already add the logit bias b). ``off_label=True`` is v2's BCE with off-targets 1/C; ``loss='ce'``
trains a conventional baseline.

Outputs in ``output/``: ``checkpoint/`` (written atomically after every epoch: accelerate's
save_state with safetensors weights, optimizer, scheduler and RNG states, plus
``trainer_state.json``), ``metrics.jsonl`` (one line per epoch), and at the end
``model.safetensors`` + ``config.json`` (`timm.models.save_for_hf`: ``timm.create_model(
'local-dir:OUTPUT', pretrained=True)`` after ``import timm_bcos``) and ``results.json`` (metrics,
recipe, data, environment).

Determinism: the order and augmentation of each epoch depend only on ``(seed, epoch)`` and the
global batches are split across processes, so ``resume=True`` continues a killed run exactly
(from its last finished epoch), and N processes see the same global batches as one.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import add_inverse

__all__ = ['CheckpointError', 'TrainConfig', 'main', 'train']

CHECKPOINT = 'checkpoint'
STATE_FILE = 'trainer_state.json'
METRICS_FILE = 'metrics.jsonl'
RESULTS_FILE = 'results.json'
WEIGHTS_FILE = 'model.safetensors'  # accelerate's name for the model in a saved state
FORMAT_VERSION = 1

SCHEDULES = ('step', 'cosine', 'constant')
LOSSES = ('bce', 'ce')
PRECISIONS = ('no', 'bf16', 'fp16')


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed: a corrupt file, or one written for another configuration."""


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in the checkpoint and in results.json).

    Model and data
        model: any timm name (``import timm_bcos`` names included: ``bcos_simple_cifar``,
            ``bcos_resnet18``, ...; ``hf-hub:``/``local-dir:`` with ``pretrained=True``).
        model_kwargs: extra ``timm.create_model`` arguments, e.g. ``{'widths': (16, 16, 32, ...)}``.
        pretrained: start from the model's pretrained weights (fine-tuning).
        num_classes: None: the dataset's class count (a different value is an error).
        data: ``'digits'`` (scikit-learn), ``'fashion-mnist'`` (Debian ``dataset-fashion-mnist``)
            or a folder with class subfolders (optionally ``train/`` and ``val/`` splits), see
            `timm_bcos.data.build_datasets`.
        img_size: None: the model's ``pretrained_cfg['input_size']``.
        train_subset: train on a fixed random subset of this many images (quick runs).
        augment: tensor datasets: random crop after padding by img_size/8 (+ horizontal flip for
            Fashion-MNIST); image folders: timm's training transform. False: none.
        auto_augment: image folders only: timm's auto-augment string, e.g. ``'rand-m9-mstd0.5'``
            (RandAugment, used by the paper).
        num_workers: DataLoader worker processes per training process.

    Optimisation (paper: Adam, lr 2.5e-4 at batch 256, no weight decay, x0.1 after 60%)
        epochs: training epochs.
        batch_size: global batch per forward pass, split across processes (must divide by their
            number). One optimiser step sees batch_size * gradient_accumulation_steps images.
        lr: learning rate at `lr_base_batch` images per optimiser step.
        lr_base_batch: the effective lr is ``lr * batch_size * gradient_accumulation_steps /
            lr_base_batch`` (linear scaling); None: `lr` as given.
        weight_decay: Adam's L2 weight decay.
        schedule: ``'step'`` (lr x `step_factor` once `step_at` of the optimiser steps are done),
            ``'cosine'`` (to 0 at the end) or ``'constant'``; all per optimiser step.
        step_at, step_factor: the step schedule (paper: 0.6 and 0.1).
        warmup_epochs: linear warm-up from lr/warmup_steps (any schedule; "training+": cosine + warm-up).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        mixed_precision: ``'no'``, ``'bf16'`` or ``'fp16'`` (accelerate autocast; fp16 adds a grad scaler).
        gradient_accumulation_steps: forward/backward passes per optimiser step.
        loss: ``'bce'`` (Eq. 16, one-hot targets) or ``'ce'`` (softmax cross entropy, baselines).
        off_label: BCE only: False: off-targets 0 (paper); True: 1/C (B-cos v2); a float: that value.

    Run
        seed: model initialisation, data order and augmentation.
        output: output folder.
        resume: continue from ``output/checkpoint`` (the last finished epoch) if there is one.
        overwrite: allow starting afresh in an output folder that holds a previous run.
        max_steps: stop after this many optimiser steps in all (smoke tests; the schedule still
            spans `epochs`). An epoch cut short gets metrics but no checkpoint.
        cpu: True: CPU even with a GPU; None: CPU only when no accelerator is present (this is
            what makes ``accelerate launch --multi_gpu`` run several CPU processes over gloo);
            ``ACCELERATE_USE_CPU=1`` also forces it.
        progress: a tqdm bar on the main process.
    """

    model: str = 'bcos_simple_cifar'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    num_classes: Optional[int] = None
    data: str = 'digits'
    img_size: Optional[int] = None
    train_subset: Optional[int] = None
    augment: bool = True
    auto_augment: Optional[str] = None
    num_workers: int = 0
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2.5e-4
    lr_base_batch: Optional[int] = 256
    weight_decay: float = 0.0
    schedule: str = 'step'
    step_at: float = 0.6
    step_factor: float = 0.1
    warmup_epochs: float = 0.0
    grad_clip: Optional[float] = None
    mixed_precision: str = 'no'
    gradient_accumulation_steps: int = 1
    loss: str = 'bce'
    off_label: Union[bool, float] = False
    seed: int = 0
    output: str = 'out/train'
    resume: bool = False
    overwrite: bool = False
    max_steps: Optional[int] = None
    cpu: Optional[bool] = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name, value, choices in (('schedule', self.schedule, SCHEDULES), ('loss', self.loss, LOSSES),
                                     ('mixed_precision', self.mixed_precision, PRECISIONS)):
            if value not in choices:
                raise ValueError(f'TrainConfig.{name} must be one of {choices}, got {value!r}')
        for name in ('epochs', 'batch_size', 'gradient_accumulation_steps'):
            if int(getattr(self, name)) < 1:
                raise ValueError(f'TrainConfig.{name} must be >= 1, got {getattr(self, name)}')
        if self.lr <= 0 or (self.lr_base_batch is not None and self.lr_base_batch <= 0):
            raise ValueError('TrainConfig.lr and lr_base_batch must be positive')
        if self.off_label is not False and self.loss != 'bce':
            raise ValueError("TrainConfig.off_label applies to loss='bce' only")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError('TrainConfig.grad_clip must be positive or None')
        if not 0 <= self.step_at <= 1:
            raise ValueError('TrainConfig.step_at is a fraction of training in [0, 1]')
        self.model_kwargs = dict(self.model_kwargs or {})

    @property
    def effective_lr(self) -> float:
        """`lr` scaled to the images per optimiser step (see `lr_base_batch`)."""
        if self.lr_base_batch is None:
            return self.lr
        return self.lr * self.batch_size * self.gradient_accumulation_steps / self.lr_base_batch

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# Settings that may change when resuming: they do not change the numbers of the run.
_RESUME_FREE = frozenset({'output', 'resume', 'overwrite', 'max_steps', 'num_workers', 'cpu', 'progress'})


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """The multiplier of the effective lr at optimiser step `step` (0-based)."""
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == 'step':
        return config.step_factor if step >= int(config.step_at * total_steps) else 1.0
    if config.schedule == 'cosine':
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def _loss_fn(config: TrainConfig):
    def loss(logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample losses (float32)."""
        logits = logits.float()
        if config.loss == 'ce':
            return F.cross_entropy(logits, y, reduction='none')
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        if config.off_label is not False:
            off = 1.0 / logits.shape[1] if config.off_label is True else float(config.off_label)
            target = target.clamp(min=off)
        # mean over classes then samples = torch's default mean over all (N, C) elements
        return F.binary_cross_entropy_with_logits(logits, target, reduction='none').mean(1)
    return loss


def _use_cpu(config: TrainConfig) -> bool:
    if config.cpu is not None:
        return bool(config.cpu)
    acc = getattr(torch, 'accelerator', None)
    if acc is not None and hasattr(acc, 'is_available'):
        return not acc.is_available()
    return not torch.cuda.is_available()


def _default_img_size(pretrained_cfg: Dict[str, Any], kwargs: Dict[str, Any]) -> Optional[int]:
    if kwargs.get('img_size') is not None:
        size = kwargs['img_size']
        return int(size if isinstance(size, int) else size[-1])
    size = pretrained_cfg.get('input_size')
    return int(size[-1]) if size else None


# --- checkpoint files -----------------------------------------------------------------------------

def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), 'rb') as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_replace(src: Path, dst: Path) -> None:
    """Put the finished folder `src` in place of `dst`: ``dst -> dst.old``, ``src -> dst``, delete
    ``dst.old``. Two renames; at any moment `dst` or ``dst.old`` is a complete checkpoint
    (`_recover_checkpoint` picks ``dst.old`` up after a crash between the renames)."""
    old = dst.with_name(dst.name + '.old')
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old.exists():
        shutil.rmtree(old)


def _recover_checkpoint(out: Path) -> None:
    """Main process, at start: drop an unfinished ``checkpoint.tmp``; restore ``checkpoint.old``
    if a crash came between the two renames of `_atomic_replace`."""
    ckpt, tmp, old = out / CHECKPOINT, out / (CHECKPOINT + '.tmp'), out / (CHECKPOINT + '.old')
    if tmp.exists():
        shutil.rmtree(tmp)
    if old.exists():
        if ckpt.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, ckpt)


def _read_state(ckpt: Path) -> Dict[str, Any]:
    path = ckpt / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f'{path}: missing; {ckpt} is not a complete timm_bcos checkpoint (delete it, or '
                              f'train without resume / with overwrite)') from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f'{path}: corrupt ({e}); delete {ckpt} to start over') from e
    if not isinstance(state, dict) or not {'format', 'epoch', 'step', 'config'} <= set(state):
        raise CheckpointError(f'{path}: not a timm_bcos trainer state (needs format, epoch, step, config)')
    if state['format'] != FORMAT_VERSION:
        raise CheckpointError(f'{path}: checkpoint format {state["format"]}, this timm_bcos reads {FORMAT_VERSION}')
    return state


def _check_compatible(state: Dict[str, Any], config: TrainConfig, path: Path) -> None:
    saved, now = state['config'], config.to_dict()
    diff = [f'{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}' for k in sorted(set(saved) | set(now))
            if k not in _RESUME_FREE and saved.get(k) != now.get(k)]
    if diff:
        raise CheckpointError(
            f'{path}: the checkpoint was written for another configuration ({"; ".join(diff)}). Resume with the '
            f'same settings, or use another output folder / overwrite=True to start afresh.')


def _check_files(ckpt: Path, process_index: int, num_processes: int, saved_processes: int,
                 optimizer: torch.optim.Optimizer, scaler: bool) -> None:
    """Open every file `load_state` reads, so that a bad one is named (accelerate skips an unreadable
    RNG file silently, and its other errors do not say which file)."""
    from accelerate.utils.other import load

    files = ['optimizer.bin', 'scheduler.bin'] + (['scaler.pt'] if scaler else [])
    if process_index < saved_processes:
        files.append(f'random_states_{process_index}.pkl')
    for name in files:
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f'{path}: missing from the checkpoint')
        try:
            obj = load(path, map_location='cpu')
        except Exception as e:
            raise CheckpointError(f'{path}: corrupt or unreadable ({type(e).__name__}: {e})') from e
        if name == 'optimizer.bin':
            groups = obj.get('param_groups') if isinstance(obj, dict) else None
            sizes = [len(g.get('params', ())) for g in groups] if isinstance(groups, list) else None
            if sizes != [len(g['params']) for g in optimizer.param_groups]:
                raise CheckpointError(f'{path}: optimizer state for parameter groups of sizes {sizes}, the model has '
                                      f'{[len(g["params"]) for g in optimizer.param_groups]}')
    if saved_processes != num_processes:
        warnings.warn(f'{ckpt} was written by {saved_processes} process(es), this run has {num_processes}: data order '
                      f'and weights continue exactly, the random states of processes >= {saved_processes} are not '
                      f'restored', stacklevel=3)


def _load_weights(model: nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f'{path}: missing from the checkpoint')
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f'{path}: corrupt safetensors file ({e})') from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f'{path}: weights do not fit the model (missing {missing[:5]}, unexpected '
                              f'{unexpected[:5]}, shapes {shapes[:5]}): a checkpoint of another model?')
    model.load_state_dict(state_dict)


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_metrics(path: Path, upto_epoch: Optional[int] = None) -> List[Dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a kill
            if isinstance(row, dict) and (upto_epoch is None or row.get('epoch', 0) <= upto_epoch):
                rows.append(row)
    return rows


# --- training ----------------------------------------------------------------------------------------

def train(config: TrainConfig) -> Dict[str, Any]:
    """Train `config.model` on `config.data`; returns the final metrics (as in results.json).

    Run it directly (one process) or under ``accelerate launch`` / ``torchrun`` (one call per
    process). Raises `CheckpointError` when ``resume=True`` meets a corrupt or incompatible
    checkpoint, `FileExistsError` when `output` holds a previous run and neither resume nor
    overwrite is set.
    """
    import timm
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from . import bcos_models  # noqa: F401  (registers the bcos_* names)
    from .data import SeededSampler, build_datasets, count_classes

    cfg = config
    out = Path(cfg.output)
    accelerator = Accelerator(
        cpu=_use_cpu(cfg), mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # the loader yields global batches; each process takes its slice: the batches do not
        # depend on the number of processes, and the scheduler steps once per optimiser step
        dataloader_config=DataLoaderConfiguration(split_batches=True))
    n_proc = accelerator.num_processes
    if cfg.batch_size % n_proc:
        raise ValueError(f'batch_size {cfg.batch_size} (global) must be divisible by the {n_proc} processes')
    if accelerator.device.type == 'cpu':
        torch.set_flush_denormal(True)  # untrained B-cos nets make denormals: 16x slower on CPU otherwise

    # Output folder: refuse to mix runs; after a crash, repair the checkpoint rename (main process).
    ckpt = out / CHECKPOINT
    leftovers = [p for p in (ckpt, out / (CHECKPOINT + '.old'), out / METRICS_FILE, out / WEIGHTS_FILE) if p.exists()]
    if leftovers and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(f'{out} holds a previous run ({", ".join(p.name for p in leftovers)}): pass resume=True '
                              f'(--resume) to continue it, overwrite=True (--overwrite) to start afresh, or another '
                              f'output folder')
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            _recover_checkpoint(out)
        if not (cfg.resume and ckpt.exists()):
            for p in (ckpt, out / (CHECKPOINT + '.old'), out / (CHECKPOINT + '.tmp')):
                if p.exists():
                    shutil.rmtree(p)
            for name in (METRICS_FILE, RESULTS_FILE, WEIGHTS_FILE, 'config.json'):
                (out / name).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    resume_state = _read_state(ckpt) if cfg.resume and ckpt.exists() else None
    if resume_state is not None:
        _check_compatible(resume_state, cfg, ckpt / STATE_FILE)

    # Data and model
    # Model first (its pretrained_cfg gives the default input size and the eval transform), with
    # the class count of the data source; then the data at that size.
    num_classes = cfg.num_classes or count_classes(cfg.data)
    set_seed(cfg.seed)  # the same initial weights on every process
    model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, **cfg.model_kwargs)
    pcfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    in_chans = int(cfg.model_kwargs.get('in_chans') or (pcfg.get('input_size') or (3,))[0])
    if in_chans not in (3, 6):
        raise ValueError(f'{cfg.model} takes {in_chans} input channels: only 3 (RGB in [0, 1]) or 6 (the B-cos '
                         f'encoding [x, 1-x]) are supported')
    img_size = cfg.img_size or _default_img_size(pcfg, cfg.model_kwargs)
    if img_size is None:
        raise ValueError(f'cannot tell the input size of {cfg.model}: set img_size')
    interpolation = pcfg.get('interpolation') or 'bilinear'
    crop_pct = pcfg.get('crop_pct') or 1.0
    data = build_datasets(cfg.data, img_size, augment=cfg.augment, auto_augment=cfg.auto_augment,
                          interpolation=interpolation, crop_pct=crop_pct, seed=cfg.seed)
    if data.num_classes != num_classes:
        raise ValueError(f'num_classes={num_classes}, but {cfg.data} has {data.num_classes} classes')
    if cfg.train_subset:
        data.limit_train(cfg.train_subset, seed=cfg.seed)

    train_sampler = SeededSampler(len(data.train), seed=cfg.seed)
    loader_kw = dict(num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                     pin_memory=accelerator.device.type == 'cuda')
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=train_sampler, drop_last=True,
                              **loader_kw)
    test_loader = DataLoader(data.test, batch_size=cfg.batch_size, sampler=SeededSampler(len(data.test),
                                                                                         shuffle=False), **loader_kw)
    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise ValueError(f'{len(data.train)} training images make no batch of {cfg.batch_size}')
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.effective_lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, steps_per_epoch, cfg))
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler)

    # The checkpoint stores the plain model's state dict (no DDP 'module.' prefix), so that a run
    # can resume on another number of processes, and loads it with a check that names the file.
    def save_hook(models, weights, output_dir):
        for i, m in enumerate(models):
            weights[i] = accelerator.unwrap_model(m).state_dict()

    def load_hook(models, input_dir):
        for m in list(models):
            _load_weights(accelerator.unwrap_model(m), Path(input_dir) / WEIGHTS_FILE)
            models.remove(m)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    start_epoch, step, history = 0, 0, []
    if resume_state is not None:
        _check_files(ckpt, accelerator.process_index, n_proc, int(resume_state.get('num_processes', 1)),
                     optimizer, accelerator.scaler is not None)
        try:
            accelerator.load_state(str(ckpt))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f'{ckpt}: cannot restore the training state ({type(e).__name__}: {e})') from e
        start_epoch, step = int(resume_state['epoch']), int(resume_state['step'])
        history = _read_metrics(out / METRICS_FILE, upto_epoch=start_epoch)
        if accelerator.is_main_process:  # drop lines of an epoch that was killed before its checkpoint
            tmp = out / (METRICS_FILE + '.tmp')
            tmp.write_text(''.join(json.dumps(r) + '\n' for r in history))
            os.replace(tmp, out / METRICS_FILE)
        accelerator.print(f'resuming {ckpt} after epoch {start_epoch} (step {step})')
    elif cfg.resume:
        accelerator.print(f'no checkpoint in {out}: starting afresh')
    accelerator.wait_for_everyone()

    loss_fn = _loss_fn(cfg)

    def encode(x: Tensor) -> Tensor:
        return add_inverse(x) if in_chans == 6 else x

    def evaluate() -> Dict[str, float]:
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        with torch.no_grad():
            for x, y in test_loader:
                with accelerator.autocast():
                    logits = model(encode(x))
                losses, correct = accelerator.gather_for_metrics((loss_fn(logits, y), logits.argmax(1) == y))
                sums += torch.stack([losses.double().sum(), correct.double().sum(),
                                     torch.tensor(float(len(losses)), device=sums.device, dtype=torch.float64)])
        loss, acc, n = sums.tolist()
        return dict(test_loss=loss / n, test_acc=acc / n, test_images=int(n))

    accelerator.print(
        f'{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.3g}M params, {in_chans}-channel input '
        f'at {img_size} px; {data.description}; {n_proc} process(es) on {accelerator.device.type}, batch '
        f'{cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation, lr {cfg.effective_lr:.3g} '
        f'({cfg.schedule}), loss {cfg.loss}, {cfg.epochs} epochs of {steps_per_epoch} steps')

    show = accelerator.is_main_process and cfg.progress
    stopped = cfg.max_steps is not None and step >= cfg.max_steps
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if stopped:
            break
        # accelerate's loader sets its sampler's epoch from its own iteration counter when iterated
        # (0 after a resume): set that counter, which passes the epoch on to SeededSampler
        train_loader.set_epoch(epoch)
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        lr = optimizer.param_groups[0]['lr']
        t0 = time.perf_counter()
        bar = tqdm(total=batches_per_epoch, desc=f'epoch {epoch + 1}/{cfg.epochs}', unit='batch', disable=not show,
                   dynamic_ncols=True, leave=True)
        batches = 0
        for x, y in train_loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(encode(x))
                losses = loss_fn(logits, y)
                accelerator.backward(losses.mean())
                if accelerator.sync_gradients and cfg.grad_clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                lr = optimizer.param_groups[0]['lr']
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            batches += 1
            if accelerator.sync_gradients:
                step += 1
            sums += torch.stack([losses.detach().double().sum(), (logits.argmax(1) == y).double().sum(),
                                 torch.tensor(float(len(y)), device=sums.device, dtype=torch.float64)])
            if show:
                bar.update(1)
                if batches % 10 == 0 or batches == batches_per_epoch:
                    s = sums.tolist()
                    bar.set_postfix(loss=f'{s[0] / s[2]:.4f}', acc=f'{s[1] / s[2]:.3f}',
                                    img_s=f'{batches * cfg.batch_size / (time.perf_counter() - t0):.0f}')
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stopped = True
                break
        bar.close()
        train_s = time.perf_counter() - t0
        complete = batches == batches_per_epoch
        loss_sum, correct, n = accelerator.reduce(sums, reduction='sum').tolist()
        t1 = time.perf_counter()
        row = dict(epoch=epoch + 1, step=step, train_loss=loss_sum / n, train_acc=correct / n, **evaluate(),
                   images_per_s=batches * cfg.batch_size / train_s, lr=lr, seconds=time.perf_counter() - t0,
                   train_seconds=train_s, eval_seconds=time.perf_counter() - t1)
        if not complete:
            row['complete'] = False
        history.append(row)
        accelerator.print(f'epoch {epoch + 1}/{cfg.epochs}: train loss {row["train_loss"]:.4f} acc '
                          f'{row["train_acc"]:.4f} | test loss {row["test_loss"]:.4f} acc {row["test_acc"]:.4f} | '
                          f'{row["images_per_s"]:.0f} img/s, {row["seconds"]:.1f} s')
        if accelerator.is_main_process:
            with open(out / METRICS_FILE, 'a') as f:
                f.write(json.dumps(row) + '\n')
        if complete:
            _save_checkpoint(accelerator, out, dict(format=FORMAT_VERSION, epoch=epoch + 1, step=step,
                                                    num_processes=n_proc, config=cfg.to_dict(), metrics=row))

    # Final model: timm's Hub format, loadable with create_model('local-dir:OUTPUT', pretrained=True)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    digests = gather_object([_weights_digest(unwrapped)])
    in_sync = len(set(digests)) == 1
    if not in_sync:
        warnings.warn(f'the processes ended with different weights: {digests}', stacklevel=2)
    last = history[-1] if history else {}
    done = max([r['epoch'] for r in history if r.get('complete', True)], default=0)
    results = dict(
        **last, epochs_completed=done, finished=done == cfg.epochs, num_processes=n_proc, weights_sha256=digests[0], processes_in_sync=in_sync, output=str(out))
    if accelerator.is_main_process:
        data_config = dict(input_size=(in_chans, img_size, img_size), interpolation=interpolation,
                           crop_pct=1.0 if cfg.data in ('digits', 'fashion-mnist') else crop_pct,
                           # no normalisation (timm wants 1 or in_chans values: one for the 6-channel models)
                           mean=(0.0,) * (3 if in_chans == 3 else 1), std=(1.0,) * (3 if in_chans == 3 else 1))
        timm.models.save_for_hf(unwrapped, out, model_config=dict(label_names=list(data.classes)),
                                safe_serialization=True, data_config=data_config)
        if in_chans == 6:
            # timm writes mean/std with one value per *model* input channel (6); the images they
            # apply to have 3 (the encoding comes after): keep the registry's 3-value form, which
            # timm_bcos.create_transform and timm's transforms take
            hf_config = json.loads((out / 'config.json').read_text())
            hf_config['pretrained_cfg'].update(mean=[0.0] * 3, std=[1.0] * 3)
            _write_json_atomic(out / 'config.json', hf_config)
        _write_json_atomic(out / RESULTS_FILE, dict(
            metrics=results, history=history, config=cfg.to_dict(),
            recipe=dict(optimizer='Adam', effective_lr=cfg.effective_lr, images_per_step=cfg.batch_size *
                        cfg.gradient_accumulation_steps, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                        schedule=cfg.schedule, loss=cfg.loss, off_label=cfg.off_label),
            data=dict(description=data.description, num_classes=num_classes, classes=list(data.classes),
                      img_size=img_size, in_chans=in_chans,
                      encoding='[x, 1-x] of [0, 1] RGB' if in_chans == 6 else 'RGB in [0, 1], no normalisation'),
            environment=dict(device=accelerator.device.type, num_processes=n_proc,
                             mixed_precision=cfg.mixed_precision, torch=torch.__version__, timm=timm.__version__,
                             accelerate=_version('accelerate'), timm_bcos=_version('timm_bcos'))))
    accelerator.wait_for_everyone()
    return results


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(pkg.replace('_', '-'))
    except Exception:
        return None


def _save_checkpoint(accelerator, out: Path, state: Dict[str, Any]) -> None:
    """accelerate's save_state into ``checkpoint.tmp`` (every process writes its RNG state), then
    trainer_state.json, fsync, and `_atomic_replace` onto ``checkpoint`` (main process)."""
    tmp = out / (CHECKPOINT + '.tmp')
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_atomic(tmp / STATE_FILE, state)
        _fsync_tree(tmp)
        _atomic_replace(tmp, out / CHECKPOINT)
    accelerator.wait_for_everyone()


# --- command line ------------------------------------------------------------------------------------

def _parse_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """``'{"widths": [8, 8]}'`` or ``widths=[8,8] b=2`` (values are JSON, else strings)."""
    if len(items) == 1 and items[0].lstrip().startswith('{'):
        return dict(json.loads(items[0]))
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep:
            raise argparse.ArgumentTypeError(f'--model-kwargs: expected KEY=VALUE or a JSON object, got {item!r}')
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _read_recipe(path: str) -> Dict[str, Any]:
    """TrainConfig fields from a JSON file (a recipe, or the ``config`` of a run's results.json)."""
    with open(path) as f:
        recipe = json.load(f)
    recipe = recipe.get('config', recipe) if isinstance(recipe, dict) else recipe
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(recipe, dict) or set(recipe) - known:
        raise ValueError(f'{path}: not a training recipe (unknown fields '
                         f'{sorted(set(recipe) - known) if isinstance(recipe, dict) else type(recipe).__name__})')
    return recipe


def _parse_off_label(value: str) -> Union[bool, float]:
    if value.lower() in ('true', 'yes', '1/c'):
        return True
    return float(value)


def build_parser(prog: str = 'timm-bcos train') -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog=prog, description='Train a timm model (B-cos or conventional) with accelerate. '
                                'Run under `accelerate launch` for several GPUs/nodes.')
    p.add_argument('--config', metavar='JSON', help='a recipe: TrainConfig fields as JSON (e.g. conversion/recipes/'
                   '*.json); other options override it')
    p.add_argument('--model', default=d.model, help=f'timm model name (default {d.model})')
    p.add_argument('--model-kwargs', nargs='+', default=[], metavar='KV',
                   help='model arguments: KEY=JSON ... or one JSON object, e.g. widths=[16,16,32,32,32,64,64,64]')
    p.add_argument('--pretrained', action='store_true', help="start from the model's pretrained weights")
    p.add_argument('--data', default=d.data, help="'digits', 'fashion-mnist' or an image folder (default digits)")
    p.add_argument('--num-classes', type=int, help="default: the dataset's")
    p.add_argument('--img-size', type=int, help="default: the model's pretrained_cfg input size")
    p.add_argument('--train-subset', type=int, help='train on a fixed random subset of N images')
    p.add_argument('--no-augment', dest='augment', action='store_false', help='no data augmentation')
    p.add_argument('--auto-augment', help="image folders: timm auto-augment string, e.g. 'rand-m9-mstd0.5'")
    p.add_argument('--num-workers', type=int, default=d.num_workers)
    p.add_argument('--epochs', type=int, default=d.epochs)
    p.add_argument('--batch-size', type=int, default=d.batch_size, help='global batch (default 256)')
    p.add_argument('--lr', type=float, default=d.lr, help='lr at --lr-base-batch images per step (default 2.5e-4)')
    p.add_argument('--lr-base-batch', type=int, default=d.lr_base_batch,
                   help='lr scales with images per step / this (default 256; 0: no scaling)')
    p.add_argument('--weight-decay', type=float, default=d.weight_decay)
    p.add_argument('--schedule', choices=SCHEDULES, default=d.schedule)
    p.add_argument('--step-at', type=float, default=d.step_at, help='step schedule: fraction of training (0.6)')
    p.add_argument('--step-factor', type=float, default=d.step_factor)
    p.add_argument('--warmup-epochs', type=float, default=d.warmup_epochs)
    p.add_argument('--grad-clip', type=float, help='max gradient norm')
    p.add_argument('--mixed-precision', choices=PRECISIONS, default=d.mixed_precision)
    p.add_argument('--grad-accum', dest='gradient_accumulation_steps', type=int, default=d.gradient_accumulation_steps)
    p.add_argument('--loss', choices=LOSSES, default=d.loss)
    p.add_argument('--off-label', type=_parse_off_label, nargs='?', const=True, default=False,
                   help='BCE off-targets: 1/C (no value, B-cos v2) or the given value')
    p.add_argument('--seed', type=int, default=d.seed)
    p.add_argument('--output', help='output folder (required unless the recipe has one)')
    p.add_argument('--resume', action='store_true', help='continue from OUTPUT/checkpoint')
    p.add_argument('--overwrite', action='store_true', help='start afresh in a folder that holds a previous run')
    p.add_argument('--max-steps', type=int)
    p.add_argument('--cpu', action='store_true', default=None, help='use the CPU even when a GPU is present')
    p.add_argument('--no-progress', dest='progress', action='store_false')
    return p


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``timm-bcos train ...`` (also ``python -m timm_bcos.train ...``, ``accelerate launch -m timm_bcos.train``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        recipe = _read_recipe(args.config) if args.config else {}
        if recipe:  # the recipe's values become the defaults; options given on the command line win
            parser.set_defaults(**{k: v for k, v in recipe.items() if k != 'model_kwargs'})
            args = parser.parse_args(argv)
        kw = vars(args)
        kw.pop('config')
        if kw['lr_base_batch'] == 0:
            kw['lr_base_batch'] = None
        kw['model_kwargs'] = {**recipe.get('model_kwargs', {}), **_parse_kwargs(kw['model_kwargs'])}
        if not kw['output']:
            raise ValueError('--output is required')
        config = TrainConfig(**kw)
    except (ValueError, argparse.ArgumentTypeError, OSError) as e:
        raise SystemExit(f'timm-bcos train: {e}')
    try:
        results = train(config)
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f'timm-bcos train: {e}')
    from accelerate import PartialState
    if PartialState().is_main_process:
        print(f'test accuracy {results.get("test_acc", float("nan")):.4f} after {results["epochs_completed"]} '
              f'epoch(s); model: {args.output}/model.safetensors + config.json, metrics: {args.output}/{METRICS_FILE}')
    return results


if __name__ == '__main__':
    main(sys.argv[1:])
