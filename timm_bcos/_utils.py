"""Helpers shared across the package: atomic file writes, package versions, the Hub's offline flag."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ['ASSETS', 'hub_offline', 'package_version', 'save_figure', 'url_cache_dir', 'write_atomic', 'write_json']

PathLike = Union[str, os.PathLike]

#: Files shipped in the package: the default model's weights, its example images, the model card template.
ASSETS = Path(__file__).parent / 'assets'


def write_atomic(path: PathLike, data: Union[str, bytes], *, fsync: bool = False) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a partial one.

    The bytes go to a temporary file in the same folder (created if missing), which then replaces
    `path` (``os.replace``). ``fsync=True`` flushes it to disk first (checkpoints that must survive
    a power cut). The file gets mode 0o644 like any other written file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: PathLike, obj: Any, *, fsync: bool = False) -> None:
    """`write_atomic` of ``obj`` as indented JSON."""
    write_atomic(path, json.dumps(obj, indent=2) + '\n', fsync=fsync)


def save_figure(fig, path: PathLike, dpi: int = 100) -> None:
    """Render a matplotlib figure to PNG and write it atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=dpi)
    write_atomic(path, buf.getvalue())


def package_version(name: str) -> Optional[str]:
    """The installed version of a distribution (``timm_bcos`` or ``timm-bcos``), None if not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name.replace('_', '-'))
    except PackageNotFoundError:
        return None


def hub_offline() -> bool:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE``, read by huggingface_hub when imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def url_cache_dir() -> str:
    """Where timm caches weights downloaded from URLs: ``$TORCH_HOME/hub/checkpoints``."""
    import torch

    return os.path.join(torch.hub.get_dir(), 'checkpoints')
