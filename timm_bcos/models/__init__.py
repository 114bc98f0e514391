"""Models: the timm registry of ``bcos_*`` / ``bcosv2_*`` names (importing it registers them), the
builder with checked weight loading and clear errors, and the paper's simple CIFAR-10 nets."""
from . import bcos_models
from .builder import CheckpointMismatchError, PretrainedWeightsError, build_bcos_model, create_model, load_model
from .conv_stem import ConvStemPatchEmbed
from .export import save_pretrained
from .simple_cifar import BcosSimpleNet, ConvHeadNet, SimpleConvNet

__all__ = ['BcosSimpleNet', 'CheckpointMismatchError', 'ConvHeadNet', 'ConvStemPatchEmbed', 'PretrainedWeightsError',
           'SimpleConvNet', 'bcos_models', 'build_bcos_model', 'create_model', 'load_model', 'save_pretrained']
