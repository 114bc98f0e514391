"""timm-bcos: B-cos networks (Böhle, Fritz, Schiele, CVPR 2022) for timm."""
from . import data, models
from .layers import (
    AddInverse,
    BcosConv2d,
    BcosLinear,
    DetachableModule,
    LogitLayer,
    explanation_mode,
    from_reference_layout,
    is_explanation_mode,
    to_reference_layout,
)
from .linearity import check_dynamic_linearity
from .models import BcosSimpleNet

__version__ = '0.1.0'
