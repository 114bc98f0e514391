"""Helpers shared across the package: safe file writes (atomic, and only where the library may write),
package versions, the Hub's offline flag."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

__all__ = ['ASSETS', 'OWNER_FILE', 'OutputFolder', 'OutputFolderError', 'first_line', 'hub_offline',
           'package_version', 'parse_kwargs', 'remove_owned', 'remove_owned_folder', 'save_figure', 'url_cache_dir',
           'write_atomic', 'write_json']

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


#: The hidden file that marks a folder as written by timm-bcos and lists the files it wrote there.
OWNER_FILE = '.timm-bcos.json'


class OutputFolderError(FileExistsError):
    """A folder or file the library will not write into: it holds files the library did not create."""


class OutputFolder:
    """A folder the library writes into: new, empty, or one that `kind` wrote before.

    The library never replaces or deletes a file it did not create: a non-empty folder it did not
    write (no `OWNER_FILE`), or one another command wrote, is refused; in its own folders, every
    name written through `path` is recorded in `OWNER_FILE`, and a file of that name that the
    library did not write is refused. `legacy(folder)` may name the files of an output written
    before `OWNER_FILE` existed (e.g. a training run), which are then adopted.
    """

    def __init__(self, path: PathLike, kind: str, legacy: Optional[Callable[[Path], Iterable[str]]] = None) -> None:
        self.root, self.kind = Path(path), kind
        if self.root.exists() and not self.root.is_dir():
            raise OutputFolderError(f'{self.root} is a file, not a folder: choose a new or empty folder for the '
                                    f'timm-bcos {kind} output')
        entries = sorted(e for e in os.listdir(self.root) if e != OWNER_FILE) if self.root.is_dir() else []
        owner = self._read_owner()
        if owner is None:
            self.files = set(legacy(self.root)) if legacy is not None and entries else set()
            if entries and not self.files:
                raise OutputFolderError(
                    f'{self.root} is not empty and was not written by timm-bcos (it holds '
                    f'{_some(entries)}): the library writes only into a new or empty folder or one it wrote '
                    f'before; choose another folder')
        elif owner.get('kind') != kind:
            raise OutputFolderError(f'{self.root} holds the output of timm-bcos {owner.get("kind")}, not of '
                                    f'{kind}: choose another folder')
        else:
            self.files = set(owner.get('files', ()))

    def _read_owner(self) -> Optional[dict]:
        try:
            owner = json.loads((self.root / OWNER_FILE).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as e:
            raise OutputFolderError(f'{self.root / OWNER_FILE}: unreadable ({e}); delete it only if the folder '
                                    f'holds nothing of yours') from e
        return owner if isinstance(owner, dict) else {}

    def foreign(self) -> List[str]:
        """The entries of the folder the library did not write (files a user put there)."""
        if not self.root.is_dir():
            return []
        return sorted(e for e in os.listdir(self.root) if e != OWNER_FILE and e not in self.files)

    def claim(self, names: Iterable[str]) -> None:
        """Record `names` (files or folders directly in the folder) as the library's, before writing
        them; refused if one exists that the library did not write. One write of `OWNER_FILE`."""
        new = [n for n in dict.fromkeys(names) if n not in self.files]
        taken = [n for n in new if os.path.lexists(self.root / n)]
        if taken:
            raise OutputFolderError(f'{self.root / taken[0]} exists and was not written by timm-bcos {self.kind}: '
                                    f'not replacing it; move it away or choose another folder')
        if new or not (self.root / OWNER_FILE).exists():
            self.files.update(new)
            write_json(self.root / OWNER_FILE, dict(kind=self.kind, files=sorted(self.files)))

    def path(self, name: str) -> Path:
        """The path to write `name` to, claimed first (`claim`)."""
        self.claim([name])
        return self.root / name


def _owned(folder: Path) -> List[str]:
    """The names `folder`'s `OWNER_FILE` lists (none if it has no readable one)."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return []
    files = owner.get('files', []) if isinstance(owner, dict) else []
    return [f for f in files if isinstance(f, str) and f and '/' not in f and f not in ('.', '..')]


def remove_owned(path: PathLike) -> None:
    """Delete the file or folder `path` if it exists, which the library must have created: its name
    is listed in the `OWNER_FILE` of the folder it is in (else `OutputFolderError`, nothing deleted).
    A folder goes entry by entry through its own `OWNER_FILE` (`remove_owned_folder`): nothing in it
    that the library did not list is deleted. Every deletion in the library goes through here."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.name not in _owned(path.parent):
        raise OutputFolderError(f'{path} was not written by timm-bcos (not listed in {path.parent / OWNER_FILE}): '
                                f'not deleting it')
    if path.is_dir() and not path.is_symlink():
        remove_owned_folder(path)
    else:
        path.unlink()


def remove_owned_folder(path: PathLike) -> None:
    """Delete a whole folder the library wrote: every entry its `OWNER_FILE` lists (`remove_owned`),
    then that file and the folder, which must then be empty (anything else in it stops the deletion
    with an `OutputFolderError` naming it; the listed entries and the listing are gone, the rest is kept)."""
    path = Path(path)
    for name in sorted(_owned(path)):
        remove_owned(path / name)
    if (path / OWNER_FILE).exists():
        (path / OWNER_FILE).unlink()
    left = sorted(os.listdir(path))
    if left:
        raise OutputFolderError(f'{path} holds files timm-bcos did not write ({", ".join(left[:5])}): not deleting '
                                f'them; move them away')
    path.rmdir()


def _some(names: List[str], limit: int = 5) -> str:
    return ', '.join(names[:limit]) + (f' and {len(names) - limit} more' if len(names) > limit else '')


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


def first_line(e: BaseException) -> str:
    """The exception's type and first line (an `UnsupportedModuleError` without its list of rules)."""
    msg = str(e).split('. Supported:')[0].strip().splitlines()
    return f'{type(e).__name__}: {msg[0] if msg else ""}'


def parse_kwargs(items: Sequence[str], option: str) -> Dict[str, Any]:
    """Command-line keyword arguments: ``'{"widths": [8, 8]}'`` or ``widths=[8,8] b=2`` (values are
    JSON, else strings); `option` names the option in the error."""
    import argparse

    if len(items) == 1 and items[0].lstrip().startswith('{'):
        return dict(json.loads(items[0]))
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise argparse.ArgumentTypeError(f'{option}: expected KEY=VALUE or a JSON object, got {item!r}')
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
