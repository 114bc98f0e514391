from .conv_net import SimpleConvNet
from .simple_net import BcosSimpleNet
