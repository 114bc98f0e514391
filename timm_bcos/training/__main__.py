"""``python -m timm_bcos.training ...`` and ``accelerate launch -m timm_bcos.training ...``: `timm-bcos train`."""
import sys

from .cli import main

if __name__ == '__main__':
    main(sys.argv[1:])
