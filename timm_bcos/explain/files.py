"""Explanations of image files: one PNG per image and a ``results.json`` (the `timm-bcos explain` command)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from torch import nn

from .._utils import OutputFolder, OutputFolderError, write_json
from ..data import load_images
from .core import explain
from .explanation import Explanation

__all__ = ['describe', 'earlier_explanations', 'explain_images', 'png_names', 'save_explanations']

PathLike = Union[str, os.PathLike]


def earlier_explanations(folder: Path) -> List[str]:
    """The files of an explain output written before `OWNER_FILE` existed: its ``results.json``, the
    PNGs it lists and the demo's ``overview.png``."""
    try:
        records = json.loads((folder / 'results.json').read_text())
        names = [os.path.basename(r['png']) for r in records]
    except (OSError, ValueError, TypeError, KeyError):
        return []
    return ['results.json', 'overview.png'] + names


def png_names(paths: Sequence[PathLike]) -> List[str]:
    """One PNG name per image, ``<stem>.png``; images of the same stem (``a/x.jpg``, ``b/x.jpg``) get
    ``x.png``, ``x-2.png``, ...: no explanation replaces another."""
    names: List[str] = []
    taken = set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, n = f'{stem}.png', 1
        while name in taken:
            n += 1
            name = f'{stem}-{n}.png'
        taken.add(name)
        names.append(name)
    return names


def save_explanations(e: Explanation, paths: Sequence[PathLike], folder: OutputFolder,
                      names: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Write image i's `Explanation.save` to ``names[i]`` (default `png_names`) in `folder`; return one
    record per image: its targets, explained values, prediction, class name, probabilities and
    ``eq13_error`` (`Explanation.check` of that image; None when it cannot be resolved)."""
    names = png_names(paths) if names is None else names
    classes = e.class_names
    records = []
    for i, (path, name) in enumerate(zip(paths, names)):
        png = folder.path(name)
        e.save(png, index=i)
        error = e.check(index=i)
        records.append(dict(
            image=os.fspath(path), png=str(png), targets=e.targets[i].tolist(), explained=e.logits[i].tolist(),
            prediction=None if e.prediction is None else int(e.prediction[i]),
            class_name=None if e.prediction is None or classes is None else classes[int(e.prediction[i])],
            probabilities=None if e.probabilities is None else e.probabilities[i].tolist(),
            eq13_error=error if math.isfinite(error) else None))
    return records


def explain_images(
        model: nn.Module,
        paths: Sequence[PathLike],
        out_dir: PathLike,
        target: Optional[int] = None,
        *,
        k: Optional[int] = None,
        layer: Optional[str] = None,
        neuron: Optional[int] = None,
        batch_size: int = 32,
) -> List[Dict[str, Any]]:
    """Explain image files: one PNG per image (`png_names`) in `out_dir` and ``results.json`` (the
    records of `save_explanations`). Images go through `create_transform(model)` and are explained
    `batch_size` at a time (one `explain` call each).

    `out_dir` must be new, empty or an earlier explain output (`OutputFolder`); an explanation that
    would replace one of the input images is refused before anything is written.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    folder = OutputFolder(out_dir, 'explain', legacy=earlier_explanations)
    names = png_names(paths)
    inputs = {os.path.realpath(p) for p in paths}
    clash = [n for n in names if os.path.realpath(folder.root / n) in inputs]
    if clash:
        raise OutputFolderError(f'the explanation {folder.root / clash[0]} would replace the input image of that '
                                f'name: choose another output folder')
    folder.claim(names + ['results.json'])  # one record of the files to come
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        x = load_images(model, chunk)
        if layer is None:
            e = explain(model, x, target, k=k)
        else:
            e = explain(model, x, layer=layer, neuron=neuron)
        results += save_explanations(e, chunk, folder, names[start:start + batch_size])
    write_json(folder.path('results.json'), results)
    return results


def describe(record: Dict[str, Any]) -> str:
    """One line for a record of `save_explanations`: prediction, explained targets, Eq. 13 error, PNG."""
    err = record['eq13_error']
    label = record['class_name'] if record['class_name'] is not None else record['prediction']
    return (f'{record["image"]}: prediction {label}  explained {record["targets"]}  '
            f'Eq. 13 error {"n/a" if err is None else f"{err:.1e}"}  -> {record["png"]}')
