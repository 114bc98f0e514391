from .simple_net import BcosSimpleNet
