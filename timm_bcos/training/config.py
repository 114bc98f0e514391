"""What a training run depends on: `TrainConfig`, the lr schedule, the loss, the model's input."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Union

import torch.nn.functional as F
from torch import Tensor

__all__ = ['BCOSIFY_RECIPE', 'LOSSES', 'PRECISIONS', 'RESUME_FREE', 'SCHEDULES', 'ModelInput', 'TrainConfig',
           'b_factor', 'loss_function', 'lr_factor', 'model_input']

SCHEDULES = ('step', 'cosine', 'constant')
LOSSES = ('bce', 'ce')
PRECISIONS = ('no', 'bf16', 'fp16')
#: B-cosification's CNN fine-tuning recipe (Arya et al. 2024: Adam lr 1e-4 at batch 256, no weight
#: decay, cosine, BCE with 1/C off-targets): `timm-bcos train --bcosify`'s defaults. Their adaptive
#: gradient clipping is not reproduced (``--grad-clip`` clips the global norm).
BCOSIFY_RECIPE = dict(lr=1e-4, schedule='cosine', off_label=True)


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
        bcosify: B-cosify the (pretrained) model before training (`timm_bcos.bcosify`, recalibrated
            on 16 training images): None (default) no; a dict of `bcosify` options (``{}``: its
            defaults, e.g. ``{'mean': [0, 0, 0], 'std': [1, 1, 1]}`` for a model trained here on
            unnormalised images).
        b_warmup_epochs: B-cosified models: B rises linearly from 1 to its target over these
            epochs (B-cosification's ramp ablation); 0: the target from the first step.

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
    bcosify: Optional[Dict[str, Any]] = None
    b_warmup_epochs: float = 0.0
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
        if self.b_warmup_epochs < 0 or (self.b_warmup_epochs and self.bcosify is None):
            raise ValueError('TrainConfig.b_warmup_epochs is a non-negative number of epochs, for bcosify runs')
        if self.bcosify is not None and not isinstance(self.bcosify, dict):
            raise ValueError(f'TrainConfig.bcosify must be None or a dict of bcosify options, got {self.bcosify!r}')
        self.model_kwargs = dict(self.model_kwargs or {})

    @property
    def effective_lr(self) -> float:
        """`lr` scaled to the images per optimiser step (see `lr_base_batch`)."""
        if self.lr_base_batch is None:
            return self.lr
        return self.lr * self.batch_size * self.gradient_accumulation_steps / self.lr_base_batch

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


#: Settings that may change when resuming: they do not change the numbers of the run.
RESUME_FREE = frozenset({'output', 'resume', 'overwrite', 'max_steps', 'num_workers', 'cpu', 'progress'})


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


def b_factor(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """The fraction of the way from B=1 to the target B at optimiser step `step` (the B ramp)."""
    ramp = config.b_warmup_epochs * steps_per_epoch
    return 1.0 if ramp <= 0 else min(1.0, step / ramp)


def loss_function(config: TrainConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """The run's loss as ``loss(logits, targets) -> per-sample losses`` (float32): BCE on one-hot
    targets (Eq. 16; off-targets `config.off_label`) or softmax cross entropy."""
    def loss(logits: Tensor, y: Tensor) -> Tensor:
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


@dataclass(frozen=True)
class ModelInput:
    """The images a model trains on: 3 channels (RGB in [0, 1]) or 6 (the B-cos encoding [x, 1-x]),
    their size, and the resize of the model's pretrained_cfg (the data pipeline and the export use it)."""

    in_chans: int
    img_size: int
    interpolation: str
    crop_pct: float


def model_input(config: TrainConfig, pretrained_cfg: Dict[str, Any]) -> ModelInput:
    """The input of `config.model`: `config`'s settings, else the model's `pretrained_cfg`."""
    in_chans = int(config.model_kwargs.get('in_chans') or (pretrained_cfg.get('input_size') or (3,))[0])
    if in_chans not in (3, 6):
        raise ValueError(f'{config.model} takes {in_chans} input channels: only 3 (RGB in [0, 1]) or 6 (the B-cos '
                         f'encoding [x, 1-x]) are supported')
    img_size = config.img_size or _default_img_size(pretrained_cfg, config.model_kwargs)
    if img_size is None:
        raise ValueError(f'cannot tell the input size of {config.model}: set img_size')
    return ModelInput(in_chans, img_size, pretrained_cfg.get('interpolation') or 'bilinear',
                      pretrained_cfg.get('crop_pct') or 1.0)


def _default_img_size(pretrained_cfg: Dict[str, Any], kwargs: Dict[str, Any]) -> Optional[int]:
    if kwargs.get('img_size') is not None:
        size = kwargs['img_size']
        return int(size if isinstance(size, int) else size[-1])
    size = pretrained_cfg.get('input_size')
    return int(size[-1]) if size else None
