"""Explanations of image files: one PNG per image and a ``results.json`` (the `timm-bcos explain` command)."""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

from torch import nn

from .._utils import write_json
from ..data import load_images
from .core import explain
from .explanation import Explanation

__all__ = ['describe', 'explain_images', 'save_explanations']

PathLike = Union[str, os.PathLike]


def save_explanations(e: Explanation, paths: Sequence[PathLike], out_dir: PathLike) -> List[Dict[str, Any]]:
    """Write image i's `Explanation.save` to ``out_dir/<stem of paths[i]>.png``; return one record per
    image: its targets, explained values, prediction, class name, probabilities and ``eq13_error``
    (`Explanation.check` of that image; None when it cannot be resolved)."""
    names = e.class_names
    records = []
    for i, path in enumerate(paths):
        png = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + '.png')
        e.save(png, index=i)
        error = e.check(index=i)
        records.append(dict(
            image=os.fspath(path), png=png, targets=e.targets[i].tolist(), explained=e.logits[i].tolist(),
            prediction=None if e.prediction is None else int(e.prediction[i]),
            class_name=None if e.prediction is None or names is None else names[int(e.prediction[i])],
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
    """Explain image files: one PNG per image in `out_dir` and ``results.json`` (the records of
    `save_explanations`). Images go through `create_transform(model)` and are explained
    `batch_size` at a time (one `explain` call each)."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        x = load_images(model, chunk)
        if layer is None:
            e = explain(model, x, target, k=k)
        else:
            e = explain(model, x, layer=layer, neuron=neuron)
        results += save_explanations(e, chunk, out_dir)
    write_json(os.path.join(out_dir, 'results.json'), results)
    return results


def describe(record: Dict[str, Any]) -> str:
    """One line for a record of `save_explanations`: prediction, explained targets, Eq. 13 error, PNG."""
    err = record['eq13_error']
    label = record['class_name'] if record['class_name'] is not None else record['prediction']
    return (f'{record["image"]}: prediction {label}  explained {record["targets"]}  '
            f'Eq. 13 error {"n/a" if err is None else f"{err:.1e}"}  -> {record["png"]}')
