"""Training with `accelerate`: the same code on 1 CPU, 1 GPU, N GPUs or N nodes.

    timm-bcos train --model bcos_simple_cifar_tiny --data fashion-mnist --output out/fmnist
    accelerate launch -m timm_bcos.training --model bcos_resnet18 --data /data/imagenette --output out/r18
    accelerate launch --multi_gpu --num_processes 2 -m timm_bcos.training ...   # 2 CPU processes (gloo)

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

import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..convert import set_b
from ..layers import add_inverse
from .checkpoint import (CHECKPOINT, FORMAT_VERSION, METRICS_FILE, WEIGHTS_FILE,
                         CheckpointError, append_metrics, check_files, load_weights, read_metrics,
                         save_checkpoint, weights_digest, write_metrics)
from .config import ModelInput, TrainConfig, b_factor, loss_function, lr_factor, model_input
from .export import export_run
from .run_folder import prepare_output

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..data import DataSplits

__all__ = ['train']


def train(config: TrainConfig) -> Dict[str, Any]:
    """Train `config.model` on `config.data`; returns the final metrics (as in results.json).

    Run it directly (one process) or under ``accelerate launch`` / ``torchrun`` (one call per
    process). Raises `CheckpointError` when ``resume=True`` meets a corrupt or incompatible
    checkpoint, `FileExistsError` when `output` holds a previous run and neither resume nor
    overwrite is set.
    """
    out = Path(config.output)
    accelerator = _accelerator(config)
    resume_state, lock = prepare_output(accelerator, config, out)
    try:
        return _run(accelerator, config, out, resume_state)
    finally:
        if lock is not None:
            lock.release()


def _run(accelerator: Accelerator, config: TrainConfig, out: Path, resume_state: Optional[Dict[str, Any]]
         ) -> Dict[str, Any]:
    """Model and data, then the epochs (from the checkpoint when resuming) and the export."""
    model, data, spec = _model_and_data(config)
    run = _prepare(accelerator, config, model, data, spec)
    start_epoch, step, history = 0, 0, []
    if resume_state is not None:
        start_epoch, step, history = _resume(run, out, resume_state)
    elif config.resume:
        accelerator.print(f'no checkpoint in {out}: starting afresh')
    accelerator.wait_for_everyone()
    accelerator.print(
        f'{config.model}: {sum(p.numel() for p in run.model.parameters()) / 1e6:.3g}M params, {spec.in_chans}-channel '
        f'input at {spec.img_size} px; {data.description}; {accelerator.num_processes} process(es) on '
        f'{accelerator.device.type}, batch {config.batch_size} x {config.gradient_accumulation_steps} accumulation, '
        f'lr {config.effective_lr:.3g} ({config.schedule}), loss {config.loss}, {config.epochs} epochs of '
        f'{run.steps_per_epoch} steps')
    _fit(run, out, start_epoch, step, history)
    return _finish(run, out, data, spec, history)


@dataclass
class _Run:
    """What the epochs work with: the accelerate-prepared objects and the sizes of the run."""

    config: TrainConfig
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # accelerate's AcceleratedScheduler around LambdaLR
    train_loader: Any  # accelerate's DataLoaderShard: global batches, this process's slice
    test_loader: Any
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    in_chans: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int

    def encode(self, x: Tensor) -> Tensor:
        """The model's input: the B-cos encoding [x, 1-x] for 6-channel models, else the images."""
        return add_inverse(x) if self.in_chans == 6 else x


# --- setup ---------------------------------------------------------------------------------------

def _accelerator(config: TrainConfig) -> Accelerator:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(
        cpu=_use_cpu(config), mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # the loader yields global batches; each process takes its slice: the batches do not
        # depend on the number of processes, and the scheduler steps once per optimiser step
        dataloader_config=DataLoaderConfiguration(split_batches=True))
    n_proc = accelerator.num_processes
    if config.batch_size % n_proc:
        raise ValueError(f'batch_size {config.batch_size} (global) must be divisible by the {n_proc} processes')
    if accelerator.device.type == 'cpu':
        torch.set_flush_denormal(True)  # untrained B-cos nets make denormals: 16x slower on CPU otherwise
    return accelerator


def _use_cpu(config: TrainConfig) -> bool:
    if config.cpu is not None:
        return bool(config.cpu)
    acc = getattr(torch, 'accelerator', None)
    if acc is not None and hasattr(acc, 'is_available'):
        return not acc.is_available()
    return not torch.cuda.is_available()


def _model_and_data(config: TrainConfig) -> Tuple[nn.Module, DataSplits, ModelInput]:
    """The model first (its pretrained_cfg gives the default input size and the eval transform),
    with the class count of the data source; then the data at that size."""
    import timm
    from accelerate.utils import set_seed

    from ..data import build_datasets, count_classes

    num_classes = config.num_classes or count_classes(config.data)
    set_seed(config.seed)  # the same initial weights on every process
    model = timm.create_model(config.model, pretrained=config.pretrained, num_classes=num_classes,
                              **config.model_kwargs)
    spec = model_input(config, dict(getattr(model, 'pretrained_cfg', None) or {}))
    data = build_datasets(config.data, spec.img_size, augment=config.augment, auto_augment=config.auto_augment,
                          interpolation=spec.interpolation, crop_pct=spec.crop_pct, seed=config.seed)
    if data.num_classes != num_classes:
        raise ValueError(f'num_classes={num_classes}, but {config.data} has {data.num_classes} classes')
    if config.train_subset:
        data.limit_train(config.train_subset, seed=config.seed)
    if config.bcosify is not None:
        model = _bcosify(model, config, data)
        spec = replace(spec, in_chans=model.bcos_cfg['in_chans'])
    return model, data, spec


def _bcosify(model: nn.Module, config: TrainConfig, data: DataSplits) -> nn.Module:
    """B-cosify the model with its (pretrained) weights, recalibrated on 16 training images."""
    from ..convert import bcosify

    images = torch.stack([data.train[i][0] for i in range(min(16, len(data.train)))])
    model = bcosify(model, calibration_data=add_inverse(images), **config.bcosify)
    if config.b_warmup_epochs:
        model.bcos_cfg['b_warmup_epochs'] = config.b_warmup_epochs
    return model


def _prepare(accelerator: Accelerator, config: TrainConfig, model: nn.Module, data: DataSplits,
             spec: ModelInput) -> _Run:
    """Loaders (seeded by (seed, epoch)), Adam and the lr schedule, all passed through
    `accelerator.prepare`; the checkpoint hooks."""
    from torch.utils.data import DataLoader

    from ..data import SeededSampler

    loader_kw = dict(num_workers=config.num_workers, persistent_workers=config.num_workers > 0,
                     pin_memory=accelerator.device.type == 'cuda')
    train_loader = DataLoader(data.train, batch_size=config.batch_size, sampler=SeededSampler(len(data.train),
                              seed=config.seed), drop_last=True, **loader_kw)
    test_loader = DataLoader(data.test, batch_size=config.batch_size,
                             sampler=SeededSampler(len(data.test), shuffle=False), **loader_kw)
    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise ValueError(f'{len(data.train)} training images make no batch of {config.batch_size}')
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = steps_per_epoch * config.epochs

    optimizer = torch.optim.Adam(model.parameters(), lr=config.effective_lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, steps_per_epoch, config))
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler)
    _register_checkpoint_hooks(accelerator)
    return _Run(config, accelerator, model, optimizer, scheduler, train_loader, test_loader, loss_function(config),
                spec.in_chans, batches_per_epoch, steps_per_epoch, total_steps)


def _register_checkpoint_hooks(accelerator: Accelerator) -> None:
    """The checkpoint stores the plain model's state dict (no DDP 'module.' prefix), so that a run
    can resume on another number of processes, and loads it with a check that names the file."""
    def save_hook(models, weights, output_dir):
        for i, m in enumerate(models):
            weights[i] = accelerator.unwrap_model(m).state_dict()

    def load_hook(models, input_dir):
        for m in list(models):
            load_weights(accelerator.unwrap_model(m), Path(input_dir) / WEIGHTS_FILE)
            models.remove(m)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _resume(run: _Run, out: Path, state: Dict[str, Any]) -> Tuple[int, int, List[Dict[str, Any]]]:
    """Restore the checkpoint (weights, optimizer, scheduler, RNG states). Returns the epoch and step
    to continue from and metrics.jsonl's rows up to them (later lines, of an epoch killed before its
    checkpoint, are dropped from the file)."""
    accelerator, ckpt = run.accelerator, out / CHECKPOINT
    saved_processes, n_proc = int(state.get('num_processes', 1)), accelerator.num_processes
    check_files(ckpt, accelerator.process_index, saved_processes, run.optimizer, accelerator.scaler is not None)
    if saved_processes != n_proc:
        warnings.warn(f'{ckpt} was written by {saved_processes} process(es), this run has {n_proc}: data order '
                      f'and weights continue exactly, the random states of processes >= {saved_processes} are not '
                      f'restored', stacklevel=3)
    try:
        accelerator.load_state(str(ckpt))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f'{ckpt}: cannot restore the training state ({type(e).__name__}: {e})') from e
    start_epoch, step = int(state['epoch']), int(state['step'])
    history = read_metrics(out / METRICS_FILE, upto_epoch=start_epoch)
    if accelerator.is_main_process:
        write_metrics(out / METRICS_FILE, history)
    accelerator.print(f'resuming {ckpt} after epoch {start_epoch} (step {step})')
    return start_epoch, step, history


# --- epochs --------------------------------------------------------------------------------------

def _fit(run: _Run, out: Path, start_epoch: int, step: int, history: List[Dict[str, Any]]) -> None:
    """The epochs from `start_epoch` on (until `max_steps`): each appends its row to `history` and
    metrics.jsonl and, if complete, writes the checkpoint."""
    config, accelerator = run.config, run.accelerator
    stopped = config.max_steps is not None and step >= config.max_steps
    for epoch in range(start_epoch, config.epochs):
        if stopped:
            break
        row, step, stopped = _train_epoch(run, epoch, step)
        history.append(row)
        accelerator.print(f'epoch {epoch + 1}/{config.epochs}: train loss {row["train_loss"]:.4f} acc '
                          f'{row["train_acc"]:.4f} | test loss {row["test_loss"]:.4f} acc {row["test_acc"]:.4f} | '
                          f'{row["images_per_s"]:.0f} img/s, {row["seconds"]:.1f} s')
        if accelerator.is_main_process:
            append_metrics(out / METRICS_FILE, row)
        if row.get('complete', True):
            save_checkpoint(accelerator, out, dict(format=FORMAT_VERSION, epoch=epoch + 1, step=step,
                                                   num_processes=accelerator.num_processes, config=config.to_dict(),
                                                   metrics=row))


def _train_epoch(run: _Run, epoch: int, step: int) -> Tuple[Dict[str, Any], int, bool]:
    """One epoch (cut short at `max_steps`), then the evaluation. Returns the epoch's metrics row,
    the optimiser steps done in all, and whether `max_steps` was reached."""
    from tqdm.auto import tqdm

    config, accelerator, model, optimizer = run.config, run.accelerator, run.model, run.optimizer
    show = accelerator.is_main_process and config.progress
    # accelerate's loader sets its sampler's epoch from its own iteration counter when iterated
    # (0 after a resume): set that counter, which passes the epoch on to SeededSampler
    run.train_loader.set_epoch(epoch)
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    lr = optimizer.param_groups[0]['lr']
    t0 = time.perf_counter()
    bar = tqdm(total=run.batches_per_epoch, desc=f'epoch {epoch + 1}/{config.epochs}', unit='batch',
               disable=not show, dynamic_ncols=True, leave=True)
    batches, stopped = 0, False
    ramp = config.b_warmup_epochs > 0
    for x, y in run.train_loader:
        if ramp:  # B from 1 to the target (B-cosification's ramp)
            target = accelerator.unwrap_model(model).bcos_cfg['b']
            set_b(model, 1 + (target - 1) * b_factor(step, run.steps_per_epoch, config))
        with accelerator.accumulate(model):
            with accelerator.autocast():
                logits = model(run.encode(x))
            losses = run.loss_fn(logits, y)
            accelerator.backward(losses.mean())
            if accelerator.sync_gradients and config.grad_clip is not None:
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            lr = optimizer.param_groups[0]['lr']
            optimizer.step()
            run.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        batches += 1
        if accelerator.sync_gradients:
            step += 1
        sums += torch.stack([losses.detach().double().sum(), (logits.argmax(1) == y).double().sum(),
                             torch.tensor(float(len(y)), device=sums.device, dtype=torch.float64)])
        if show:
            bar.update(1)
            if batches % 10 == 0 or batches == run.batches_per_epoch:
                s = sums.tolist()
                bar.set_postfix(loss=f'{s[0] / s[2]:.4f}', acc=f'{s[1] / s[2]:.3f}',
                                img_s=f'{batches * config.batch_size / (time.perf_counter() - t0):.0f}')
        if config.max_steps is not None and step >= config.max_steps:
            stopped = True
            break
    bar.close()
    train_s = time.perf_counter() - t0
    loss_sum, correct, n = accelerator.reduce(sums, reduction='sum').tolist()
    t1 = time.perf_counter()
    row = dict(epoch=epoch + 1, step=step, train_loss=loss_sum / n, train_acc=correct / n, **_evaluate(run),
               images_per_s=batches * config.batch_size / train_s, lr=lr, seconds=time.perf_counter() - t0,
               train_seconds=train_s, eval_seconds=time.perf_counter() - t1)
    if batches != run.batches_per_epoch:
        row['complete'] = False
    return row, step, stopped


def _evaluate(run: _Run) -> Dict[str, float]:
    """Loss and accuracy on the whole test set (gathered from all processes, padding dropped)."""
    accelerator, model = run.accelerator, run.model
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for x, y in run.test_loader:
            with accelerator.autocast():
                logits = model(run.encode(x))
            losses, correct = accelerator.gather_for_metrics((run.loss_fn(logits, y), logits.argmax(1) == y))
            sums += torch.stack([losses.double().sum(), correct.double().sum(),
                                 torch.tensor(float(len(losses)), device=sums.device, dtype=torch.float64)])
    loss, acc, n = sums.tolist()
    return dict(test_loss=loss / n, test_acc=acc / n, test_images=int(n))


# --- end -----------------------------------------------------------------------------------------

def _finish(run: _Run, out: Path, data: DataSplits, spec: ModelInput,
            history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The final metrics (with a check that all processes hold the same weights) and, on the main
    process, the export of the model and results.json."""
    from accelerate.utils import gather_object

    config, accelerator, n_proc = run.config, run.accelerator, run.accelerator.num_processes
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(run.model, keep_fp32_wrapper=False)
    digests = gather_object([weights_digest(unwrapped)])
    in_sync = len(set(digests)) == 1
    if not in_sync:
        warnings.warn(f'the processes ended with different weights: {digests}', stacklevel=3)
    last = history[-1] if history else {}
    done = max([r['epoch'] for r in history if r.get('complete', True)], default=0)
    results = dict(**last, epochs_completed=done, finished=done == config.epochs, num_processes=n_proc,
                   weights_sha256=digests[0], processes_in_sync=in_sync, output=str(out))
    if accelerator.is_main_process:
        export_run(unwrapped, out, config, data, spec, metrics=results, history=history,
                   steps_per_epoch=run.steps_per_epoch, total_steps=run.total_steps,
                   device=accelerator.device.type, num_processes=n_proc)
    accelerator.wait_for_everyone()
    return results
