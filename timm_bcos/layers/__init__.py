"""B-cos layers (paper §3): the B-cos transform, its classifiers, input encoding, explanation mode."""
from .attention import DynamicAttention
from .bcos_cond_conv import BcosCondConv2d
from .bcos_conv import BcosConv2d, BcosConv2dSame
from .calibration import CalibratedConstant, calibration_keys
from .bcos_linear import BcosLinear
from .constant import ExplainedConstant, contribution, explained_constants
from .classifier import BcosClassifier, BcosConvClassifier
from .encoding import AddInverse, InputShift, add_inverse
from .explain_mode import DetachableModule, explanation_mode, is_explanation_mode
from .gate import ActivationGate, DynamicGate
from .logit import LogitLayer
from .norm import BatchNormUncentered2d, GroupNormUncentered, LayerNorm2dUncentered, LayerNormUncentered
from .unit_layout import from_reference_layout, to_reference_layout
from .zero_inputs import skipping_zero_inputs

__all__ = [
    'ActivationGate', 'AddInverse', 'BatchNormUncentered2d', 'BcosClassifier', 'BcosCondConv2d', 'BcosConv2d',
    'BcosConv2dSame', 'BcosConvClassifier', 'BcosLinear', 'CalibratedConstant', 'DetachableModule', 'DynamicAttention',
    'DynamicGate', 'ExplainedConstant', 'GroupNormUncentered', 'InputShift', 'LayerNorm2dUncentered',
    'LayerNormUncentered', 'LogitLayer', 'add_inverse', 'calibration_keys', 'contribution', 'explained_constants',
    'explanation_mode', 'from_reference_layout', 'is_explanation_mode', 'skipping_zero_inputs',
    'to_reference_layout',
]
