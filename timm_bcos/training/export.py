"""The end of a run: the model in timm's Hub format (``model.safetensors`` + ``config.json``,
loadable with ``timm.create_model('local-dir:OUTPUT', pretrained=True)`` after ``import timm_bcos``)
and ``results.json`` (metrics, recipe, data, environment)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List

import torch
from torch import nn

from .._utils import package_version, write_json
from ..data import BUILTIN_CLASSES
from ..models.export import save_pretrained
from ..version import __version__
from .checkpoint import RESULTS_FILE
from .config import ModelInput, TrainConfig

if TYPE_CHECKING:
    from ..data import DataSplits

__all__ = ['export_run', 'save_model']


def save_model(model: nn.Module, out: Path, config: TrainConfig, data: DataSplits, spec: ModelInput) -> None:
    """`save_pretrained` with the run's input (no normalisation), class names and a description of
    this run (not of the weights the model was registered with)."""
    channels = 3 if spec.in_chans == 3 else 1
    data_config = dict(input_size=(spec.in_chans, spec.img_size, spec.img_size), interpolation=spec.interpolation,
                       crop_pct=1.0 if config.data in BUILTIN_CLASSES else spec.crop_pct,
                       # no normalisation (timm wants 1 or in_chans values: one for the 6-channel models)
                       mean=(0.0,) * channels, std=(1.0,) * channels)
    description = f'{config.model} trained with timm-bcos for {config.epochs} epochs on {data.description}'
    save_pretrained(model, str(out), description=description, label_names=data.classes, data_config=data_config,
                    fsync=True)


def export_run(model: nn.Module, out: Path, config: TrainConfig, data: DataSplits, spec: ModelInput, *,
               metrics: Dict[str, Any], history: List[Dict[str, Any]], steps_per_epoch: int, total_steps: int,
               device: str, num_processes: int) -> None:
    """Main process, after training: `save_model`, then results.json with the final `metrics`, the
    per-epoch `history` and what the run depended on."""
    import timm

    save_model(model, out, config, data, spec)
    write_json(out / RESULTS_FILE, dict(
        metrics=metrics, history=history, config=config.to_dict(),
        recipe=dict(optimizer='Adam', effective_lr=config.effective_lr,
                    images_per_step=config.batch_size * config.gradient_accumulation_steps,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps, schedule=config.schedule,
                    loss=config.loss, off_label=config.off_label),
        data=dict(description=data.description, num_classes=data.num_classes, classes=list(data.classes),
                  img_size=spec.img_size, in_chans=spec.in_chans,
                  encoding='[x, 1-x] of [0, 1] RGB' if spec.in_chans == 6 else 'RGB in [0, 1], no normalisation'),
        environment=dict(device=device, num_processes=num_processes, mixed_precision=config.mixed_precision,
                         torch=torch.__version__, timm=timm.__version__, accelerate=package_version('accelerate'),
                         timm_bcos=__version__)), fsync=True)
