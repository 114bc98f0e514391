"""The explorer's model side (`timm-bcos serve`): models loaded once, images resized as each model's
transform does, explanations batched over images and top-k classes and cached per image.

Nothing here imports Gradio: the page (`timm_bcos.app.ui`) only lays out what `Explorer` renders.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..data import create_transform, open_image
from ..explain import Explanation, explain
from ..layers import BcosConv2d, BcosLinear

__all__ = ['DEFAULT_MODEL', 'Explorer', 'ExplorerError', 'View', 'heatmap', 'on_black', 'upscale']

DEFAULT_MODEL = 'bcos_simple_cifar_tiny.fashion_mnist'
DISPLAY_SIZE = 224  # small inputs (28-32 px) are shown enlarged, pixel for pixel
ImageLike = Union[str, os.PathLike, Any]  # a file, or a PIL image


class ExplorerError(ValueError):
    """Bad input to the explorer (an unreadable image, an unknown model, layer or class): its message
    is shown in the page."""


@dataclass(frozen=True)
class View:
    """One explained unit (a class logit or an inner neuron) of one image, ready to show.

    colour: the paper's visualisation (`Explanation.to_rgba`) on black, (H', W', 3) uint8;
    contributions: the contribution map of Eq. 15 in blue-white-red, (H', W', 3) uint8;
    value: the explained logit (or activation); eq13_error: `Explanation.check` of this unit.
    """

    title: str
    colour: np.ndarray
    contributions: np.ndarray
    value: float
    eq13_error: float


def upscale(image: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """Enlarge an (H, W, ...) image by the integer factor that brings its side closest to `size`
    from below (at least 1), nearest neighbour: one model pixel stays a square block."""
    f = max(1, size // max(image.shape[:2]))
    return image.repeat(f, 0).repeat(f, 1)


def on_black(rgba: np.ndarray) -> np.ndarray:
    """An (H, W, 4) float image in [0, 1] composited on black, as uint8 RGB (the explanation PNGs' look)."""
    return np.round(rgba[..., :3] * rgba[..., 3:] * 255).astype(np.uint8)


def heatmap(values: Tensor) -> np.ndarray:
    """An (H, W) map as uint8 RGB: blue (negative) - white (0) - red (positive), symmetric about 0."""
    v = values.double().cpu()
    v = v / (v.abs().max().item() or 1.0)
    pos, neg = v.clamp(min=0), (-v).clamp(min=0)
    rgb = torch.stack([1 - neg, 1 - pos - neg, 1 - pos], -1)  # red keeps R; blue keeps B
    return np.round(rgb.clamp(0, 1).numpy() * 255).astype(np.uint8)


def _row(e: Explanation, i: int) -> Explanation:
    """Image `i` of a batch explanation, as a batch of one."""
    take = lambda t: None if t is None else t[i:i + 1]  # noqa: E731
    fields = {f.name: take(getattr(e, f.name)) for f in dataclasses.fields(e)
              if isinstance(getattr(e, f.name), Tensor)}
    constants = None if e.constants is None else {k: v[i:i + 1] for k, v in e.constants.items()}
    return dataclasses.replace(e, constants=constants, **fields)


class _Entry:
    """What is known about one image under one model: the top-k explanation (its `inputs` are the
    encoded image) and any further class explanations asked for."""

    def __init__(self, top: Explanation) -> None:
        self.top = top
        self.extra: Dict[int, Explanation] = {}


class Explorer:
    """Models by name and the explanations of images under them, cached per image.

    Args:
        models: what `timm_bcos.load_model` accepts: registered names (with their weights),
            ``local-dir:PATH`` or ``hf-hub:ORG/NAME``; the first is the default. Each is loaded on
            first use and kept.
        topk: classes shown (and explained, in one batched call) per image.
        cache_size: images kept per explorer (least recently used dropped first).
        display_size: side the shown images are enlarged towards.
    """

    def __init__(self, models: Sequence[str] = (DEFAULT_MODEL,), topk: int = 5, cache_size: int = 64,
                 display_size: int = DISPLAY_SIZE) -> None:
        if not models:
            raise ValueError('give at least one model')
        self.names = list(dict.fromkeys(models))
        self.topk = topk
        self.cache_size = cache_size
        self.display_size = display_size
        self._models: Dict[str, nn.Module] = {}
        self._cache: 'OrderedDict[Tuple[str, str], _Entry]' = OrderedDict()
        self._lock = threading.RLock()  # explain() is not thread-safe for a shared model

    def model(self, name: str) -> nn.Module:
        """The model `name` (one of `names`), loaded on first use."""
        from ..models import load_model

        if name not in self.names:
            raise ExplorerError(f'model {name!r} is not served here; choose one of {self.names}')
        with self._lock:
            if name not in self._models:
                model = load_model(name)
                if not hasattr(model, 'pretrained_cfg'):
                    raise ExplorerError(f'{name} has no pretrained_cfg: cannot tell its input size')
                self._models[name] = model.eval()
            return self._models[name]

    def class_names(self, name: str) -> List[str]:
        """The model's label names, or ``class 0``, ``class 1``, ..."""
        model = self.model(name)
        names = model.pretrained_cfg.get('label_names')
        return list(names) if names else [f'class {c}' for c in range(model.num_classes)]

    def prepare(self, name: str, images: Sequence[ImageLike]) -> Tensor:
        """Images (files or PIL images) through the model's eval transform (resize, crop, [x, 1-x]):
        (N, 6, H, W). An unreadable file is an `ExplorerError` naming it."""
        transform = create_transform(self.model(name))
        out = []
        for image in images:
            if image is None:
                raise ExplorerError('no image: upload one or pick an example')
            try:
                pil = image.convert('RGB') if hasattr(image, 'convert') else open_image(image)
            except (OSError, ValueError) as e:
                cause = type(e.__cause__ or e).__name__
                raise ExplorerError(f'cannot read {os.path.basename(os.fspath(image))}: not an image file PIL can '
                                    f'open ({cause})') from e
            out.append(transform(pil))
        return torch.stack(out)

    def top_classes(self, name: str, images: Sequence[ImageLike]) -> List[Explanation]:
        """Each image's explanation of its `topk` classes (one batched `explain` for the images not
        cached yet), as batches of one."""
        x = self.prepare(name, images)
        keys = [self._key(name, xi) for xi in x]
        with self._lock:
            todo = [i for i, k in enumerate(keys) if k not in self._cache]
            if todo:
                k = min(self.topk, self.model(name).num_classes)
                e = explain(self.model(name), x[todo], k=k)
                for j, i in enumerate(todo):
                    self._store(keys[i], _Entry(_row(e, j)))
            for key in keys:
                self._cache.move_to_end(key)
            return [self._cache[key].top for key in keys]

    def class_view(self, name: str, image: ImageLike, target: Optional[int] = None) -> View:
        """The explanation of class `target` (default: the top class) for `image`."""
        with self._lock:  # the image's cache entry stays while it is used
            top = self.top_classes(name, [image])[0]
            target = int(top.targets[0, 0]) if target is None else int(target)
            n = self.model(name).num_classes
            if not 0 <= target < n:
                raise ExplorerError(f'class {target} out of range: {name} has {n} classes')
            if target in top.targets[0].tolist():
                return self._view(top, top.column(target))
            entry = self._cache[self._key(name, top.inputs[0])]
            if target not in entry.extra:
                entry.extra[target] = explain(self.model(name), entry.top.inputs, target)
            return self._view(entry.extra[target], 0)

    def neuron_view(self, name: str, image: ImageLike, layer: str, channel: int) -> View:
        """The explanation of channel `channel` of module `layer` (at its strongest position) for `image`."""
        if layer not in self.layers(name):
            raise ExplorerError(f'{layer!r} is not one of the explained layers of {name}: {self.layers(name)}')
        channels = self.layers(name)[layer]
        if not 0 <= int(channel) < channels:
            raise ExplorerError(f'channel {channel} out of range: {layer} has {channels} channels (0-{channels - 1})')
        x = self.prepare(name, [image])
        with self._lock:
            e = explain(self.model(name), x, layer=layer, neuron=int(channel))
        return self._view(e, 0)

    def posthoc_view(self, name: str, image: ImageLike, method: str, target: Optional[int] = None) -> View:
        """A post-hoc attribution (`timm_bcos.evaluation.attribution`: gradient, IxG, IG, DeepLIFT,
        Grad-CAM, occlusion) of the same model and class, for comparison with B-cos: its map in
        `contributions` and in `colour` (no colour code: post-hoc maps have no W(x))."""
        from ..evaluation.attribution import POST_HOC, attribute

        if method not in POST_HOC:
            raise ExplorerError(f'unknown post-hoc method {method!r}; choose from {POST_HOC}')
        top = self.top_classes(name, [image])[0]
        target = int(top.targets[0, 0]) if target is None else int(target)
        with self._lock:
            maps = attribute(self.model(name), method, top.inputs[:, :3], torch.tensor([[target]]))
        rgb = upscale(heatmap(maps[0, 0]), self.display_size)
        return View(f'{method}: {self.class_names(name)[target]}', rgb, rgb, float('nan'), float('nan'))

    def layers(self, name: str) -> Dict[str, int]:
        """Modules whose neurons can be explained, with their channel counts: timm's `feature_info`
        stages, else the B-cos layers."""
        model = self.model(name)
        info = getattr(model, 'feature_info', None)
        found = {}
        if isinstance(info, list) and info and all(isinstance(f, dict) and 'module' in f for f in info):
            found = {f['module']: int(f['num_chs']) for f in info}
        if not found:
            found = {n: int(m.out_channels if isinstance(m, BcosConv2d) else m.out_features)
                     for n, m in model.named_modules() if isinstance(m, (BcosConv2d, BcosLinear))}
        return found

    def input_image(self, name: str, image: ImageLike) -> np.ndarray:
        """The image as the model sees it (after its transform), enlarged: (H', W', 3) uint8."""
        x = self.prepare(name, [image])[0, :3]
        return upscale(np.round(x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8), self.display_size)

    def _view(self, e: Explanation, column: int) -> View:
        names = e.class_names
        return View(e.label(0, column, names), upscale(on_black(e.to_rgba(0, column)), self.display_size),
                    upscale(heatmap(e.contributions[0, column]), self.display_size),
                    float(e.logits[0, column]), _column_error(e, column))

    def _key(self, name: str, x: Tensor) -> Tuple[str, str]:
        """Cache key of one encoded image (C, H, W) under model `name`: what the model sees, so
        that the same picture uploaded twice (or at another size that resizes the same) is one entry."""
        return name, hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()

    def _store(self, key: Tuple[str, str], entry: _Entry) -> None:
        self._cache[key] = entry
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


def _column_error(e: Explanation, column: int) -> float:
    """`Explanation.check` of one target column (of a batch of one)."""
    one = dataclasses.replace(e, **{f: getattr(e, f)[:, column:column + 1] for f in
                                    ('weights', 'contributions', 'logits', 'targets', 'bias')},
                              constants=None if e.constants is None else
                              {k: v[:, column:column + 1] for k, v in e.constants.items()},
                              probabilities=None, positions=None)
    return one.check()
