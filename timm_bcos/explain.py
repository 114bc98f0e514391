"""Model-inherent explanations of B-cos networks (paper §3.2.1, Eq. 13-15; visualisation §4).

In explanation mode a B-cos network computes ``f(x) = W(x) x + b`` with ``b = f(0)`` (Eq. 13), so
one backward pass from an output gives the row ``[W_{1->l}(x)]_j`` that explains it exactly, and
``W(x) * x`` are the input contributions (Eq. 15). `explain` does this for a whole batch and any
number of targets with one forward pass and one backward pass per target column: samples are
independent, so the input gradient of ``sum_n f(x_n)[t_n]`` holds every image's row at once.
"""
from __future__ import annotations

import difflib
import math
import os
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import AddInverse, BcosConv2d, explanation_mode
from .linearity import relative_error

__all__ = ['Explanation', 'explain', 'explain_images']

TargetLike = Union[int, Sequence[int], Sequence[Sequence[int]], Tensor, np.ndarray]

# `explain(verify=True)` fails above this relative error of Eq. 13.
VERIFY_TOLERANCE = 1e-4


@dataclass(eq=False)
class Explanation:
    """Exact explanations of a batch: ``logits = contributions.sum((-2, -1)) + bias`` (Eq. 13, 15).

    Attributes:
        weights: rows of the dynamic linear map W(x), (N, T, C, H, W) with C the input channels.
        contributions: ``sum_c W(x) * x``, the spatial contribution maps of Eq. 15, (N, T, H, W).
        logits: the explained outputs (class logits, or activations of `layer`), (N, T).
        targets: the explained class (or channel) per image and column, (N, T).
        bias: the output at x = 0, ``b`` of Eq. 13, (N, T).
        inputs: the encoded inputs, (N, C, H, W).
        prediction: the predicted class per image, (N,); None for a `layer` explanation.
        probabilities: ``sigmoid(logits)`` (B-cos models train with BCE), (N, T); None for a layer.
        layer: the explained module's name, None for the model's outputs.
        positions: the explained spatial position per image and column, (N, T, S) for S spatial
            dims of the layer's output; None for logits and (N, C) activations.
        class_names: the model's label names (``pretrained_cfg['label_names']``) if it has them.
    """

    weights: Tensor
    contributions: Tensor
    logits: Tensor
    targets: Tensor
    bias: Tensor
    inputs: Tensor
    prediction: Optional[Tensor] = None
    probabilities: Optional[Tensor] = None
    layer: Optional[str] = None
    positions: Optional[Tensor] = None
    class_names: Optional[List[str]] = None

    def check(self) -> float:
        """Max relative error of Eq. 13: ``|contributions.sum + bias - logits| / max |logits - bias|``.

        Normalised by ``|logits - bias|``, not ``|logits|``: untrained B-cos outputs are tiny next
        to a logit bias. Returns NaN with a warning when ``logits - bias`` is too small to resolve
        in the logits' dtype (never a vacuous 0), inf when any of them is NaN or inf.
        """
        if not all(torch.isfinite(t).all() for t in (self.contributions, self.bias, self.logits)):
            return math.inf
        err = (self.contributions.sum((-2, -1)) + self.bias - self.logits).abs().max()
        return relative_error(err, (self.logits - self.bias).abs().max(), self.logits, 'Explanation.check')

    def column(self, target: int, index: int = 0) -> int:
        """The column of class (or channel) `target` among image `index`'s explained targets."""
        self._check_index(index)
        hits = (self.targets[index] == int(target)).nonzero().flatten().tolist()
        if not hits:
            raise ValueError(f'{target} was not explained for image {index}; explained targets: '
                             f'{self.targets[index].tolist()}')
        return hits[0]

    def delta(self, c1: int, c2: int, index: int = 0) -> Tensor:
        """Δ-explanation (Fig. 9): contribution map of target column `c1` minus that of `c2`, (H, W).

        `c1`, `c2` are target *columns* (0 is the top class with ``k=...``), as in `to_rgba`; map
        class ids to columns with `column`. Positive values are evidence for `c1` over `c2`.
        """
        self._check_index(index)
        self._check_column(c1)
        self._check_column(c2)
        return self.contributions[index, c1] - self.contributions[index, c2]

    def to_rgba(self, index: int = 0, target: int = 0, smooth: int = 1, percentile: float = 99.5) -> np.ndarray:
        """The paper's colour visualisation of a row of W(x) (§4 "Visualisations details").

        Only pixels that contribute positively (``sum_c W * x > 0``) are visible. Colours: W is
        divided by its max |value| over channels, clamped to >= 0, and each channel pair is
        normalised to ``r = w_r / (w_r + w_{1-r})`` (keeps the pair's angle, lands in [0, 1]).
        Opacity: ``min(||w_(x,y)||_2 / p, 1)`` with p the `percentile` of the weight norms over all
        positions, average-pooled over `smooth` x `smooth` visible pixels (odd `smooth`; 1 = none).

        Args:
            index: the image.
            target: the target column (0 = first explained target).
            smooth: odd kernel size of the opacity smoothing.
            percentile: the opacity cut-off percentile, in (0, 100].

        Returns:
            float32 array (H, W, 4) in [0, 1]; masked pixels have alpha exactly 0.
        """
        self._check_index(index)
        self._check_column(target)
        if not (isinstance(smooth, int) and smooth >= 1 and smooth % 2 == 1):
            raise ValueError(f'smooth must be an odd positive int, got {smooth!r}')
        if not 0 < percentile <= 100:
            raise ValueError(f'percentile must be in (0, 100], got {percentile!r}')
        w = self.weights[index, target].double()
        if w.shape[0] != 6:
            raise ValueError(f'the colour visualisation needs the 6-channel encoding [x, 1-x] (§4), '
                             f'got {w.shape[0]} input channels')
        visible = (self.contributions[index, target] > 0).double()
        norm = torch.linalg.vector_norm(w, dim=0)
        cutoff = torch.quantile(norm.flatten(), percentile / 100)
        alpha = (norm / cutoff).clamp(max=1) if cutoff > 0 else torch.zeros_like(norm)
        alpha = alpha * visible
        if smooth > 1:
            # Mean over the visible pixels of each window, so hidden pixels do not darken the edges.
            pool = lambda t: F.avg_pool2d(t[None, None], smooth, 1, smooth // 2)[0, 0]  # noqa: E731
            alpha = pool(alpha) / pool(visible).clamp_min(1e-12) * visible
        rgb = (w / w.abs().amax(0).clamp_min(torch.finfo(w.dtype).tiny)).clamp(min=0)
        rgb = rgb[:3] / (rgb[:3] + rgb[3:]).clamp_min(1e-12)
        rgba = torch.cat([rgb, alpha[None]]).clamp(0, 1).permute(1, 2, 0)
        return rgba.float().cpu().numpy()

    def plot(self, index: int = 0, ax=None, class_names: Optional[Sequence[str]] = None):
        """Draw image `index`: one row per target with the input, `to_rgba` and the contribution map.

        Args:
            index: the image.
            ax: optional (T, 3) array of matplotlib axes to draw into (3 * T axes in any shape);
                default: a new figure (not registered with pyplot, so no global state changes).
            class_names: titles for class ids; default: the model's label names, if any.

        Returns:
            the matplotlib Figure.
        """
        self._check_index(index)
        return self._draw([index], ax, class_names)

    def save(self, path: Union[str, os.PathLike], class_names: Optional[Sequence[str]] = None,
             index: Optional[int] = None) -> None:
        """Write the `plot` of image `index` (default: all images, stacked) to a PNG, atomically.

        The figure goes to a temporary file next to `path`, then replaces `path` (os.replace):
        readers never see a partial file.
        """
        indices = range(len(self.inputs)) if index is None else [index]
        for i in indices:
            self._check_index(i)
        fig = self._draw(list(indices), None, class_names)
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(suffix='.png', prefix='.explanation-', dir=os.path.dirname(path) or '.')
        try:
            with os.fdopen(fd, 'wb') as f:
                fig.savefig(f, format='png', dpi=100)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    def _draw(self, indices: List[int], ax, class_names: Optional[Sequence[str]]):
        figure, canvas = _matplotlib()
        names = list(class_names) if class_names is not None else self.class_names
        t = self.targets.shape[1]
        rows = len(indices) * t
        if ax is None:
            fig = figure.Figure(figsize=(7.5, 2.6 * rows), layout='constrained')
            canvas(fig)
            axes = np.asarray(fig.subplots(rows, 3, squeeze=False))
        else:
            axes = np.asarray(ax, dtype=object)
            if axes.size != rows * 3:
                raise ValueError(f'ax must hold {rows * 3} axes ({rows} targets x 3 panels), got {axes.size}')
            axes = axes.reshape(rows, 3)
            fig = axes[0, 0].figure
        for r, (i, j) in enumerate((i, j) for i in indices for j in range(t)):
            image = self.inputs[i, :3].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
            contrib = self.contributions[i, j].float().cpu().numpy()
            vmax = float(np.abs(contrib).max()) or 1.0
            a_img, a_rgba, a_map = axes[r]
            a_img.imshow(image)
            a_img.set_title(f'image {i}', fontsize=9)
            a_rgba.set_facecolor('black')
            a_rgba.imshow(self.to_rgba(i, j))
            a_rgba.set_title(self._label(i, j, names), fontsize=9)
            im = a_map.imshow(contrib, cmap='bwr', vmin=-vmax, vmax=vmax)
            a_map.set_title('contributions (Eq. 15)', fontsize=9)
            fig.colorbar(im, ax=a_map, fraction=0.046, pad=0.04)
            for a in axes[r]:
                a.set_xticks([])
                a.set_yticks([])
        return fig

    def _label(self, i: int, j: int, names: Optional[Sequence[str]]) -> str:
        c = int(self.targets[i, j])
        if self.layer is not None:
            where = '' if self.positions is None else f' @ {tuple(self.positions[i, j].tolist())}'
            return f'{self.layer}[{c}]{where}: {self.logits[i, j].item():.3g}'
        name = names[c] if names is not None and c < len(names) else f'class {c}'
        return f'{name}: p={self.probabilities[i, j].item():.3f}'

    def _check_index(self, index: int) -> None:
        if not -len(self.inputs) <= index < len(self.inputs):
            raise IndexError(f'image index {index} out of range for {len(self.inputs)} images')

    def _check_column(self, column: int) -> None:
        t = self.targets.shape[1]
        if not -t <= column < t:
            raise IndexError(f'target column {column} out of range: {t} targets were explained '
                             f'(use Explanation.column(class_id) to look up a class)')


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the network is not needed for a layer's neuron."""


def explain(
        model: nn.Module,
        x: Tensor,
        target: Optional[TargetLike] = None,
        *,
        layer: Optional[str] = None,
        neuron: Optional[TargetLike] = None,
        position: Optional[Sequence[int]] = None,
        k: Optional[int] = None,
        verify: bool = False,
) -> Explanation:
    """Explain a batch exactly by the rows of the dynamic linear map W(x) (Eq. 13-15).

    One forward pass of the batch in explanation mode, then one backward pass per target column,
    each giving that column's row of W(x) for all N images. The model runs in eval mode with its
    parameters frozen (no weight gradients); both are restored afterwards. Not thread-safe for a
    model shared between threads.

    Args:
        model: a dynamic-linear model (a B-cos network) mapping the encoded input to (N, classes).
        x: (N, 6, H, W) encoded input, or (N, 3, H, W) images in [0, 1] (encoded with `AddInverse`
            when the model's first convolution takes 6 channels).
        target: classes to explain: None (the prediction), an int (for every image), N ints (one
            per image) or an (N, T) tensor (T per image).
        layer: explain a neuron of this module (a name from ``model.named_modules()``) instead of
            the outputs, with ``W_{1->l}`` of Eq. 15. Its first call in the forward is explained.
        neuron: with `layer`: the channel(s) to explain: an int, a sequence (the same channels for
            every image) or an (N, T) tensor.
        position: with `layer`: the spatial position (one index per spatial dim) of the neuron;
            default: where each image's channel activates most (as in Fig. 10).
        k: explain each image's top-k classes, ordered by logit (instead of `target`).
        verify: raise RuntimeError if Eq. 13 holds only to a relative error above 1e-4 (`check`).
    """
    if layer is None and (neuron is not None or position is not None):
        raise ValueError('neuron and position select a unit of `layer`: pass layer=... as well')
    if layer is not None and (target is not None or k is not None):
        raise ValueError('with layer=..., choose the unit with neuron=... (target and k select classes)')
    module = None if layer is None else _find_module(model, layer)
    params = [p for p in model.parameters() if p.requires_grad]
    training = [(m, m.training) for m in model.modules()]
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        with torch.inference_mode(False), torch.enable_grad(), explanation_mode(model):
            x = _encode(model, x)
            if module is None:
                result = _explain_outputs(model, x, target, k)
            else:
                result = _explain_layer(model, module, layer, x, neuron, position)
    finally:
        for p in params:
            p.requires_grad_(True)
        for m, mode in training:
            m.training = mode
    cfg = getattr(model, 'pretrained_cfg', None)
    names = cfg.get('label_names') if isinstance(cfg, dict) else None
    result.class_names = list(names) if names is not None else None
    if verify:
        error = result.check()
        if error > VERIFY_TOLERANCE:
            raise RuntimeError(f'Eq. 13 violated: sum(W(x) * x) + b differs from the explained outputs by '
                               f'{error:.2e} of |f(x) - b| (tolerance {VERIFY_TOLERANCE:g}); the model is '
                               f'not dynamic-linear in explanation mode or f(0) is not its bias')
    return result


def _explain_outputs(model: nn.Module, x: Tensor, target, k: Optional[int]) -> Explanation:
    out = model(x)
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f'explain expects (N, classes) logits from the model, got {shape}; '
                         f'explain an intermediate output with layer=..., neuron=...')
    targets = _resolve_targets(target, k, out.detach())
    rows = torch.arange(len(x), device=x.device)
    selected = out[rows[:, None], targets]
    weights = _input_rows(selected, x)
    with torch.no_grad():
        bias = model(torch.zeros_like(x[:1]))[0, targets]
    logits = selected.detach()
    return _assemble(weights, x, logits, targets, bias, prediction=out.detach().argmax(1),
                     probabilities=torch.sigmoid(logits))


def _explain_layer(model: nn.Module, module: nn.Module, name: str, x: Tensor, neuron, position) -> Explanation:
    act = _capture(model, module, name, x)
    n, c, spatial = act.shape[0], act.shape[1], act.shape[2:]
    neurons = _resolve_neurons(neuron, n, c, x.device)
    flat = act.reshape(n, c, -1)  # (N, C, P); P = 1 for (N, C) activations
    rows = torch.arange(n, device=x.device)[:, None]
    if position is not None:
        pos = _resolve_position(position, spatial)
        index = torch.full_like(neurons, int(np.ravel_multi_index(pos, tuple(spatial))) if spatial else 0)
    else:
        index = flat.detach()[rows, neurons].argmax(-1)  # (N, T): the maximally activating location
    selected = flat[rows, neurons, index]
    weights = _input_rows(selected, x)
    with torch.no_grad():
        zero = _capture(model, module, name, torch.zeros_like(x[:1])).reshape(1, c, -1)
    bias = zero[0, neurons, index]
    positions = None
    if spatial:
        sizes = torch.tensor(tuple(spatial), device=x.device)
        strides = torch.tensor([math.prod(spatial[d + 1:]) for d in range(len(spatial))], device=x.device)
        positions = index[..., None] // strides % sizes
    return _assemble(weights, x, selected.detach(), neurons, bias, layer=name, positions=positions)


def _input_rows(selected: Tensor, x: Tensor) -> Tensor:
    """Rows of W(x) for every column of `selected` (N, T): one backward per column, (N, T, *x)."""
    t = selected.shape[1]
    weights = x.new_empty((len(x), t) + x.shape[1:])
    for j in range(t):
        (weights[:, j],) = torch.autograd.grad(selected[:, j].sum(), x, retain_graph=j + 1 < t)
    return weights


def _assemble(weights: Tensor, x: Tensor, logits: Tensor, targets: Tensor, bias: Tensor, **extra) -> Explanation:
    x = x.detach()
    contributions = (weights * x[:, None]).sum(2)  # Eq. 15, summed over the colour channels
    return Explanation(weights=weights, contributions=contributions, logits=logits, targets=targets,
                       bias=bias.detach().to(logits.dtype), inputs=x, **extra)


def _capture(model: nn.Module, module: nn.Module, name: str, x: Tensor) -> Tensor:
    """`module`'s output on its first call in ``model(x)``; the forward stops right after it."""
    captured = []

    def hook(_module, _inputs, output):
        captured.append(output)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f'layer {name!r} was not called in the forward pass of the model')
    act = captured[0]
    if not isinstance(act, Tensor) or act.dim() < 2:
        what = tuple(act.shape) if isinstance(act, Tensor) else type(act).__name__
        raise ValueError(f'layer {name!r} must output an (N, C, ...) tensor to explain its neurons, got {what}')
    return act


def _find_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
    hint = f'close matches: {close}' if close else f'top-level modules: {[n for n, _ in model.named_children()]}'
    raise ValueError(f'unknown layer {name!r}; {hint} (names as in model.named_modules())')


def _expected_channels(model: nn.Module) -> Optional[int]:
    """Input channels of the model's first B-cos convolution (else first convolution), if any."""
    for kind in (BcosConv2d, nn.Conv2d):
        for m in model.modules():
            if isinstance(m, kind):
                return m.in_channels
    return None


def _encode(model: nn.Module, x: Tensor) -> Tensor:
    """Validate `x`, encode 3-channel images with `AddInverse`, move to the model's device and dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f'explain expects a torch.Tensor, got {type(x).__name__}')
    if not x.is_floating_point():
        raise TypeError(f'explain expects a floating point tensor, got dtype {x.dtype}')
    if x.dim() != 4:
        hint = ' (add a batch dimension: x.unsqueeze(0))' if x.dim() == 3 else ''
        raise ValueError(f'explain expects a batch of images (N, C, H, W), got shape {tuple(x.shape)}{hint}')
    if len(x) == 0:
        raise ValueError('explain got an empty batch')
    if not torch.isfinite(x).all():
        raise ValueError('explain got NaN or inf input values')
    expected = _expected_channels(model)
    if expected is not None and x.shape[1] != expected:
        if expected == 6 and x.shape[1] == 3:
            x = AddInverse()(x)  # checks the [0, 1] range
        else:
            also = ' or (N, 3, H, W) images in [0, 1]' if expected == 6 else ''
            raise ValueError(f'the model expects input of shape (N, {expected}, H, W){also}, got '
                             f'{tuple(x.shape)}')
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        x = x.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else x.dtype)
    # A fresh leaf: never the caller's tensor (nor an inference tensor), whatever its grad state.
    return x.detach().clone().requires_grad_(True)


def _as_index_tensor(value, what: str, device: torch.device) -> Tensor:
    try:
        t = torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f'{what} must be an int, a sequence of ints or an integer tensor, got {value!r}') from e
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f'{what} must hold integers, got dtype {t.dtype}')
    return t.long()


def _check_range(t: Tensor, size: int, what: str) -> Tensor:
    if t.numel() == 0:
        raise ValueError(f'no {what} to explain')
    if t.min() < 0 or t.max() >= size:
        bad = t[(t < 0) | (t >= size)].unique().tolist()
        raise ValueError(f'{what} must be in [0, {size}), got {bad}')
    return t


def _resolve_targets(target, k: Optional[int], out: Tensor) -> Tensor:
    """The (N, T) class indices to explain from `target` / `k` (see `explain`)."""
    n, c = out.shape
    if k is not None:
        if target is not None:
            raise ValueError('pass either target or k, not both')
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= c:
            raise ValueError(f'k must be an int in [1, {c}] (the number of classes), got {k!r}')
        return out.topk(k, dim=1).indices
    if target is None:
        return out.argmax(1, keepdim=True)
    t = _as_index_tensor(target, 'target', out.device)
    if t.dim() == 0:
        t = t.expand(n, 1)
    elif t.dim() == 1:
        if len(t) != n:
            raise ValueError(f'a 1-D target gives one class per image: expected {n} entries, got {len(t)} '
                             f'(for several classes per image pass an (N, T) tensor, or k=...)')
        t = t[:, None]
    elif t.dim() != 2 or t.shape[0] != n:
        raise ValueError(f'target must be an int, {n} ints or an ({n}, T) tensor, got shape {tuple(t.shape)}')
    return _check_range(t, c, 'target classes')


def _resolve_neurons(neuron, n: int, c: int, device: torch.device) -> Tensor:
    """The (N, T) channels of a layer to explain (see `explain`)."""
    if neuron is None:
        raise ValueError('layer=... needs neuron=... (the channel index to explain)')
    t = _as_index_tensor(neuron, 'neuron', device)
    if t.dim() <= 1:
        t = t.reshape(1, -1).expand(n, -1)
    elif t.dim() != 2 or t.shape[0] != n:
        raise ValueError(f'neuron must be an int, a sequence of ints or an ({n}, T) tensor, got shape '
                         f'{tuple(t.shape)}')
    return _check_range(t, c, f'neuron (channels of a {c}-channel layer)')


def _resolve_position(position: Sequence[int], spatial: torch.Size) -> Tuple[int, ...]:
    pos = tuple(int(p) for p in position)
    if len(pos) != len(spatial) or any(not 0 <= p < s for p, s in zip(pos, spatial)):
        raise ValueError(f'position must give {len(spatial)} indices within the layer\'s spatial size '
                         f'{tuple(spatial)}, got {tuple(position)}')
    return pos


def _matplotlib():
    """(matplotlib.figure, FigureCanvasAgg), imported lazily: matplotlib is an optional dependency."""
    try:
        from matplotlib import figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError as e:
        raise ImportError('plotting explanations needs matplotlib: pip install matplotlib, or timm-bcos[eval]') from e
    return figure, FigureCanvasAgg


def explain_images(
        model: nn.Module,
        paths: Sequence[Union[str, os.PathLike]],
        out_dir: Union[str, os.PathLike],
        target: Optional[int] = None,
        *,
        k: Optional[int] = None,
        layer: Optional[str] = None,
        neuron: Optional[int] = None,
        batch_size: int = 32,
) -> List[dict]:
    """Explain image files: one PNG per image in `out_dir` and ``results.json`` (predictions,
    probabilities, the Eq. 13 faithfulness error per image). Images go through
    `create_transform(model)` and are explained `batch_size` at a time (one `explain` call each)."""
    import json
    from .data import load_images

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
        names = e.class_names
        for i, path in enumerate(chunk):
            png = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + '.png')
            e.save(png, index=i)
            error = _image_error(e, i)
            results.append(dict(
                image=os.fspath(path), png=png, targets=e.targets[i].tolist(), explained=e.logits[i].tolist(),
                prediction=None if e.prediction is None else int(e.prediction[i]),
                class_name=None if e.prediction is None or names is None else names[int(e.prediction[i])],
                probabilities=None if e.probabilities is None else e.probabilities[i].tolist(),
                faithfulness_error=error if math.isfinite(error) else None))
    fd, tmp = tempfile.mkstemp(suffix='.json', dir=out_dir)
    with os.fdopen(fd, 'w') as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, 'results.json'))
    return results


def _image_error(e: Explanation, i: int) -> float:
    """`Explanation.check` restricted to image `i`."""
    contributions, bias, logits = e.contributions[i], e.bias[i], e.logits[i]
    if not all(torch.isfinite(t).all() for t in (contributions, bias, logits)):
        return math.inf
    err = (contributions.sum((-2, -1)) + bias - logits).abs().max()
    return relative_error(err, (logits - bias).abs().max(), logits, 'explain_images')
