"""The reference implementations' released weights: B-cos v1 (the paper's models) and B-cos v2,
mapped key for key onto our converted timm models and checked strictly."""
from .reference import StateDictMismatchError, prepare_vgg_head
from .v1 import (V1_MODELS, V1StateDictError, create_v1_model, load_v1_state_dict, map_v1_state_dict,
                 v1_cifar_settings, v1_weights_file)
from .v2 import V2_ARCHS, V2_CONVERT_KWARGS, V2StateDictError, create_v2_model, load_v2_state_dict, map_v2_state_dict

__all__ = ['V1_MODELS', 'V2_ARCHS', 'V2_CONVERT_KWARGS', 'StateDictMismatchError', 'V1StateDictError',
           'V2StateDictError', 'create_v1_model', 'create_v2_model', 'load_v1_state_dict', 'load_v2_state_dict',
           'map_v1_state_dict', 'map_v2_state_dict', 'prepare_vgg_head', 'v1_cifar_settings', 'v1_weights_file']
