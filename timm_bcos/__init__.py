"""timm-bcos: B-cos networks (Böhle, Fritz, Schiele, CVPR 2022) for timm."""
from . import bcos_models, data, models
from .convert import UnsupportedModuleError, convert_to_bcos, unconverted_modules
from .explain import Explanation, check_dynamic_linearity, explain
from .layers import (
    AddInverse,
    BatchNormUncentered2d,
    BcosConv2d,
    BcosLinear,
    DetachableModule,
    DynamicGate,
    GroupNormUncentered,
    LayerNorm2dUncentered,
    LogitLayer,
    explanation_mode,
    from_reference_layout,
    is_explanation_mode,
    to_reference_layout,
)
from .models import BcosSimpleNet
from .pretrained import CheckpointMismatchError, PretrainedWeightsError, create_model
from .data import create_transform, load_images

__version__ = '0.1.0'
