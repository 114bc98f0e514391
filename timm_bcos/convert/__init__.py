"""The converter: any timm CNN (or a user's own) to an exact B-cos network (paper §3.3)."""
from .bcosify import bcosify, bcosify_args, input_normalisation, set_b
from .calibrate import CalibrationResult, calibrate_scales, calibration_batch
from .converter import convert_to_bcos, gate_branches, unconverted_modules
from .mixin import BcosModelMixin, attach_bcos_mixin
from .rules import MODULE_RULES, TRUSTED_FORWARDS, ModuleRule, UnsupportedModuleError

__all__ = ['MODULE_RULES', 'TRUSTED_FORWARDS', 'BcosModelMixin', 'CalibrationResult', 'ModuleRule',
           'UnsupportedModuleError', 'attach_bcos_mixin', 'bcosify', 'bcosify_args', 'calibrate_scales',
           'calibration_batch', 'convert_to_bcos', 'gate_branches', 'input_normalisation', 'set_b',
           'unconverted_modules']
