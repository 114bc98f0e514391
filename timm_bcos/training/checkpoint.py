"""A run's files: the checkpoint (written atomically after every epoch, checked file by file before
resuming) and metrics.jsonl.

The checkpoint folder is accelerate's ``save_state`` (safetensors weights, optimizer, scheduler and
RNG states) plus ``trainer_state.json``. It is written to ``checkpoint.tmp`` and then renamed into
place, so that a kill at any moment leaves a complete checkpoint (`atomic_replace`,
`recover_checkpoint`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from torch import nn

from .._utils import OutputFolder, remove_owned, write_atomic, write_json
from .config import RESUME_FREE, TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ['CHECKPOINT', 'FORMAT_VERSION', 'METRICS_FILE', 'RESULTS_FILE', 'STATE_FILE', 'WEIGHTS_FILE',
           'CheckpointError', 'append_metrics', 'atomic_replace', 'check_compatible', 'check_files', 'load_weights',
           'read_metrics', 'read_state', 'recover_checkpoint', 'save_checkpoint', 'weights_digest', 'write_metrics']

CHECKPOINT = 'checkpoint'
STATE_FILE = 'trainer_state.json'
METRICS_FILE = 'metrics.jsonl'
RESULTS_FILE = 'results.json'
WEIGHTS_FILE = 'model.safetensors'  # accelerate's name for the model in a saved state
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed: a corrupt file, or one written for another configuration."""


# --- writing ---------------------------------------------------------------------------------------

def save_checkpoint(accelerator: Accelerator, out: Path, state: Dict[str, Any]) -> None:
    """accelerate's save_state into ``checkpoint.tmp`` (every process writes its RNG state), then
    trainer_state.json, fsync, and `atomic_replace` onto ``checkpoint`` (main process)."""
    tmp = out / (CHECKPOINT + '.tmp')
    if accelerator.is_main_process:
        if tmp.exists():
            remove_owned(tmp)
        # the folder lists what save_state writes into it: only those are ever deleted with it
        OutputFolder(tmp, 'checkpoint').claim(checkpoint_files(accelerator.num_processes))
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, state, fsync=True)
        _fsync_tree(tmp)
        atomic_replace(tmp, out / CHECKPOINT)
    accelerator.wait_for_everyone()


def checkpoint_files(num_processes: int) -> List[str]:
    """The files of a checkpoint folder: accelerate's save_state (weights, optimizer, scheduler, the
    fp16 grad scaler, one RNG state per process) and trainer_state.json."""
    return [WEIGHTS_FILE, 'optimizer.bin', 'scheduler.bin', 'scaler.pt', STATE_FILE,
            *(f'random_states_{i}.pkl' for i in range(num_processes))]


def atomic_replace(src: Path, dst: Path) -> None:
    """Put the finished folder `src` in place of `dst`: ``dst -> dst.old``, ``src -> dst``, delete
    ``dst.old``. Two renames; at any moment `dst` or ``dst.old`` is a complete checkpoint
    (`recover_checkpoint` picks ``dst.old`` up after a crash between the renames)."""
    old = dst.with_name(dst.name + '.old')
    if old.exists():
        remove_owned(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old.exists():
        remove_owned(old)


def recover_checkpoint(out: Path) -> None:
    """Main process, at start: drop an unfinished ``checkpoint.tmp``; restore ``checkpoint.old``
    if a crash came between the two renames of `atomic_replace`."""
    ckpt, tmp, old = out / CHECKPOINT, out / (CHECKPOINT + '.tmp'), out / (CHECKPOINT + '.old')
    if tmp.exists():
        remove_owned(tmp)
    if old.exists():
        if ckpt.exists():
            remove_owned(old)
        else:
            os.replace(old, ckpt)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), 'rb') as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- reading and checking ----------------------------------------------------------------------

def read_state(ckpt: Path) -> Dict[str, Any]:
    """The checkpoint's trainer_state.json (format, epoch, step, config, ...)."""
    path = ckpt / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f'{path}: missing; {ckpt} is not a complete timm_bcos checkpoint (delete it, or '
                              f'train without resume / with overwrite)') from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f'{path}: corrupt ({e}); delete {ckpt} to start over') from e
    if not isinstance(state, dict) or not {'format', 'epoch', 'step', 'config'} <= set(state):
        raise CheckpointError(f'{path}: not a timm_bcos trainer state (needs format, epoch, step, config)')
    if state['format'] != FORMAT_VERSION:
        raise CheckpointError(f'{path}: checkpoint format {state["format"]}, this timm_bcos reads {FORMAT_VERSION}')
    return state


def check_compatible(state: Dict[str, Any], config: TrainConfig, path: Path) -> None:
    """Refuse to resume with settings that change the numbers of the run (all but `RESUME_FREE`)."""
    saved, now = state['config'], config.to_dict()
    diff = [f'{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}' for k in sorted(set(saved) | set(now))
            if k not in RESUME_FREE and saved.get(k) != now.get(k)]
    if diff:
        raise CheckpointError(
            f'{path}: the checkpoint was written for another configuration ({"; ".join(diff)}). Resume with the '
            f'same settings, or use another output folder / overwrite=True to start afresh.')


def check_files(ckpt: Path, process_index: int, saved_processes: int, optimizer: torch.optim.Optimizer,
                scaler: bool) -> None:
    """Open every file `load_state` reads, so that a bad one is named (accelerate skips an unreadable
    RNG file silently, and its other errors do not say which file)."""
    from accelerate.utils import load

    files = ['optimizer.bin', 'scheduler.bin'] + (['scaler.pt'] if scaler else [])
    if process_index < saved_processes:
        files.append(f'random_states_{process_index}.pkl')
    for name in files:
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f'{path}: missing from the checkpoint')
        try:
            obj = load(path, map_location='cpu')
        except Exception as e:
            raise CheckpointError(f'{path}: corrupt or unreadable ({type(e).__name__}: {e})') from e
        if name == 'optimizer.bin':
            groups = obj.get('param_groups') if isinstance(obj, dict) else None
            sizes = [len(g.get('params', ())) for g in groups] if isinstance(groups, list) else None
            if sizes != [len(g['params']) for g in optimizer.param_groups]:
                raise CheckpointError(f'{path}: optimizer state for parameter groups of sizes {sizes}, the model has '
                                      f'{[len(g["params"]) for g in optimizer.param_groups]}')


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint's safetensors weights into `model`, naming the file when they are corrupt or
    do not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f'{path}: missing from the checkpoint')
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f'{path}: corrupt safetensors file ({e})') from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f'{path}: weights do not fit the model (missing {missing[:5]}, unexpected '
                              f'{unexpected[:5]}, shapes {shapes[:5]}): a checkpoint of another model?')
    model.load_state_dict(state_dict)


def weights_digest(model: nn.Module) -> str:
    """sha256 of the state dict's names and bytes (the processes of a run must agree on it)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- metrics.jsonl -------------------------------------------------------------------------------

def read_metrics(path: Path, upto_epoch: Optional[int] = None) -> List[Dict[str, Any]]:
    """The rows of metrics.jsonl (up to epoch `upto_epoch`); a line cut off by a kill is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a kill
            if isinstance(row, dict) and (upto_epoch is None or row.get('epoch', 0) <= upto_epoch):
                rows.append(row)
    return rows


def append_metrics(path: Path, row: Dict[str, Any]) -> None:
    """Add one epoch's row to metrics.jsonl."""
    with open(path, 'a') as f:
        f.write(json.dumps(row) + '\n')


def write_metrics(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Replace metrics.jsonl with `rows` (atomically)."""
    write_atomic(path, ''.join(json.dumps(r) + '\n' for r in rows))
