"""``python -m timm_bcos.evaluation ...``: `timm-bcos evaluate`."""
import sys

from .cli import main

if __name__ == '__main__':
    main(sys.argv[1:])
