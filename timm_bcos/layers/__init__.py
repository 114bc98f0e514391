from .bcos_function import from_reference_layout, to_reference_layout
from .bcos_conv import BcosConv2d, BcosConv2dSame
from .bcos_linear import BcosLinear
from .encoding import AddInverse
from .explain_mode import DetachableModule, explanation_mode, is_explanation_mode
from .logit import LogitLayer
from .gate import DynamicGate
from .norm import BatchNormUncentered2d, GroupNormUncentered, LayerNorm2dUncentered
