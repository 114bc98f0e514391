"""Training with accelerate (paper §5 recipe): exact resume from atomic checkpoints, export to timm's Hub format."""
from .checkpoint import CheckpointError
from .cli import build_parser, main
from .config import BCOSIFY_RECIPE, LOSSES, PRECISIONS, SCHEDULES, TrainConfig, loss_function, lr_factor
from .loop import train

__all__ = ['BCOSIFY_RECIPE', 'LOSSES', 'PRECISIONS', 'SCHEDULES', 'CheckpointError', 'TrainConfig', 'build_parser',
           'loss_function', 'lr_factor', 'main', 'train']
