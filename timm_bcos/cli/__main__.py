"""``python -m timm_bcos.cli ...``: the `timm-bcos` command."""
from .main import main

main()
