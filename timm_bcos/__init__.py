"""timm-bcos: B-cos networks (Böhle, Fritz, Schiele, CVPR 2022) for timm.

``import timm_bcos`` registers the ``bcos_*`` and ``bcosv2_*`` models with timm. The data flow of the
package: layers -> convert -> models / weights -> explain -> training / evaluation / hub -> cli.
"""
from . import models as models  # registers the bcos_* / bcosv2_* names with timm
from ._utils import OutputFolderError
from .convert import UnsupportedModuleError, bcosify, calibrate_scales, convert_to_bcos, unconverted_modules
from .cpu_memory import keep_freed_cpu_memory
from .data import create_transform, load_images
from .explain import Explanation, check_dynamic_linearity, explain, explain_images
from .hub import HubPublishError, publish, pull
from .layers import (ActivationGate, AddInverse, BatchNormUncentered2d, BcosClassifier, BcosConv2d, BcosConv2dSame,
                     BcosConvClassifier, BcosLinear, DetachableModule, DynamicAttention, DynamicGate,
                     ExplainedConstant, GroupNormUncentered, LayerNorm2dUncentered, LayerNormUncentered, LogitLayer,
                     add_inverse, explanation_mode, from_reference_layout, is_explanation_mode, to_reference_layout)
from .models import BcosSimpleNet, CheckpointMismatchError, PretrainedWeightsError, load_model
from .training import CheckpointError, TrainConfig, train
from .version import __version__ as __version__

__all__ = [
    # convert any timm CNN (or your own), and check the result; B-cosify a trained one
    'UnsupportedModuleError', 'bcosify', 'calibrate_scales', 'convert_to_bcos', 'unconverted_modules',
    # explain
    'Explanation', 'check_dynamic_linearity', 'explain', 'explain_images', 'explanation_mode', 'is_explanation_mode',
    # layers
    'ActivationGate', 'AddInverse', 'BatchNormUncentered2d', 'BcosClassifier', 'BcosConv2d', 'BcosConv2dSame',
    'BcosConvClassifier', 'BcosLinear', 'DetachableModule', 'DynamicAttention', 'DynamicGate', 'ExplainedConstant',
    'GroupNormUncentered', 'LayerNorm2dUncentered', 'LayerNormUncentered', 'LogitLayer', 'add_inverse',
    'from_reference_layout', 'to_reference_layout',
    # models, images, weights
    'BcosSimpleNet', 'CheckpointMismatchError', 'PretrainedWeightsError', 'create_transform', 'load_images',
    'load_model',
    # training and the Hub
    'CheckpointError', 'HubPublishError', 'TrainConfig', 'publish', 'pull', 'train',
    # writing files: never into a folder (or over a file) the library did not create
    'OutputFolderError',
    # CPU speed: reuse freed memory instead of page-faulting fresh memory for every large tensor
    'keep_freed_cpu_memory',
]
