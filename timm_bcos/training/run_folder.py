"""The output folder of a training run: only a new, empty or own run folder is used, one run at a
time (a lock), and a previous run is continued (``resume``) or cleared (``overwrite``) only when asked."""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .._utils import OutputFolder, OutputFolderError, remove_owned
from .checkpoint import (CHECKPOINT, METRICS_FILE, RESULTS_FILE, STATE_FILE, WEIGHTS_FILE, check_compatible,
                         read_state, recover_checkpoint)
from .config import TrainConfig

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ['LOCK_FILE', 'RUN_FILES', 'RunLock', 'prepare_output']

LOCK_FILE = 'run.lock'
#: Everything a run writes into its folder (accelerate's state goes into the checkpoint folders).
RUN_FILES = (CHECKPOINT, CHECKPOINT + '.tmp', CHECKPOINT + '.old', METRICS_FILE, RESULTS_FILE, WEIGHTS_FILE,
             'config.json', LOCK_FILE)


class RunLock:
    """An exclusive lock on a run folder for the process that trains into it (``fcntl.flock``: the
    system releases it when that process ends, even when it is killed). The lock file names the
    holder, so that a second run can say which process uses the folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: Optional[int] = None
        if fcntl is None:
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'unknown process'
            os.close(fd)
            raise OutputFolderError(f'{path.parent} is in use by another training run ({holder}; lock file {path}): '
                                    f'wait for it to end, or train into another folder') from None
        os.ftruncate(fd, 0)
        now = datetime.datetime.now().isoformat(timespec='seconds')
        os.pwrite(fd, f'process {os.getpid()} on {socket.gethostname()} since {now}'.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _earlier_run(folder: Path) -> List[str]:
    """The files of a run written before `OWNER_FILE` existed (it has a checkpoint or a metrics log)."""
    if (folder / CHECKPOINT / STATE_FILE).is_file() or (folder / METRICS_FILE).is_file():
        return [name for name in RUN_FILES if (folder / name).exists()]
    return []


def prepare_output(accelerator: Accelerator, config: TrainConfig, out: Path) -> Tuple[Optional[Dict[str, Any]],
                                                                                        Optional[RunLock]]:
    """Claim and lock the run folder (main process), repair an interrupted checkpoint rename when
    resuming, clear a previous run unless resuming. Returns the trainer state to resume from (None:
    start afresh) and the lock (main process; release it when the run ends)."""
    folder = OutputFolder(out, 'train', legacy=_earlier_run)  # every process: refuses a folder that is not a run's
    ckpt = out / CHECKPOINT
    leftovers = [p for p in (ckpt, out / (CHECKPOINT + '.old'), out / METRICS_FILE, out / WEIGHTS_FILE) if p.exists()]
    if leftovers and not config.resume and not config.overwrite:
        raise FileExistsError(f'{out} holds a previous run ({", ".join(p.name for p in leftovers)}): pass resume=True '
                              f'(--resume) to continue it, overwrite=True (--overwrite) to start afresh, or another '
                              f'output folder')
    accelerator.wait_for_everyone()
    lock = None
    if accelerator.is_main_process:
        folder.claim(RUN_FILES)  # recorded as the run's own; refused if a file of that name is the user's
        lock = RunLock(out / LOCK_FILE)
        try:
            if config.resume:
                recover_checkpoint(out)
            if not (config.resume and ckpt.exists()):
                _clear(out)
        except BaseException:
            lock.release()
            raise
    accelerator.wait_for_everyone()
    try:
        resume_state = read_state(ckpt) if config.resume and ckpt.exists() else None
        if resume_state is not None:
            check_compatible(resume_state, config, ckpt / STATE_FILE)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return resume_state, lock


def _clear(out: Path) -> None:
    """Delete the previous run's files (the run's own, see `RUN_FILES`) to start afresh."""
    for name in RUN_FILES:
        if name != LOCK_FILE:
            remove_owned(out / name)
