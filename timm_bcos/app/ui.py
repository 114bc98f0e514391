"""The explorer page (Gradio, the Hub's own UI library): top-k classes, a class's colour explanation
(Eq. 15 visualisation) and contribution map with its Eq. 13 error, two classes or B-cos vs a
post-hoc method side by side, and inner neurons. One named API endpoint, ``explain``, for
``gradio_client``.
"""
from __future__ import annotations

import functools
import os
import time
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..data import demo_images
from .explorer import Explorer, ExplorerError, View

__all__ = ['build_app', 'serve']

POST_HOC_CHOICES = ('gradcam', 'ig', 'ixg', 'grad', 'deeplift', 'occlusion')
_FONTS = dict(font=['ui-sans-serif', 'system-ui', 'sans-serif'], font_mono=['ui-monospace', 'monospace'])  # offline
_CSS = '#explanation img, #contributions img, .pixelated img {image-rendering: pixelated;}'


def _page_errors(fn: Callable) -> Callable:
    """Show bad input (an unreadable file, a wrong layer or channel) as a message in the page, and any
    other failure as one line with its type, never as a stack trace."""
    import gradio as gr

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ExplorerError, ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # shown, not hidden behind a generic 'Error'
            raise gr.Error(f'{type(e).__name__}: {e}') from None
    return run


def _path(value: Any) -> Optional[str]:
    """The file of an image the page or a client sent (Gradio's file payload, or a path), unread:
    the explorer opens it itself, so an unreadable file gets its message, not Gradio's."""
    return value.get('path') if isinstance(value, dict) else value


def _info(view: View) -> str:
    if view.eq13_error != view.eq13_error:  # NaN: post-hoc maps have no Eq. 13
        return f'**{view.title}**'
    return (f'**{view.title}** (logit {view.value:.4g}). Eq. 13: `sum(W(x) x) + b` equals the logit to a relative '
            f'error of **{view.eq13_error:.1e}**.')


def _handlers(explorer: Explorer) -> SimpleNamespace:
    """The page's callbacks; each shows bad input as a message (`_page_errors`)."""
    import gradio as gr

    @_page_errors
    def explain_api(images: List[Any], models: List[str]) -> Tuple[List[Dict[str, float]], List[Any]]:
        images = [_path(im) for im in images]
        labels, pictures = [None] * len(images), [None] * len(images)
        for model in dict.fromkeys(m for m, im in zip(models, images) if im is not None):  # one explain per model
            idx = [i for i, m in enumerate(models) if m == model and images[i] is not None]
            tops = explorer.top_classes(model, [images[i] for i in idx])
            classes = explorer.class_names(model)
            for i, top in zip(idx, tops):
                labels[i] = {classes[int(c)]: float(p) for c, p in zip(top.targets[0], top.probabilities[0])}
                pictures[i] = explorer.class_view(model, images[i], int(top.targets[0, 0])).colour
        return labels, pictures

    @_page_errors
    def show_class(image: Any, model: str, class_name: Optional[str]):
        """The chosen class (default: the top one), and it against the next best class in *Compare*."""
        image = _path(image)
        if image is None:  # the image was cleared
            return gr.update(), None, None, '', None, gr.update(), gr.update()
        classes = explorer.class_names(model)
        target = classes.index(class_name) if class_name in classes else None
        view = explorer.class_view(model, image, target)
        ranked = [classes[int(c)] for c in explorer.top_classes(model, [image])[0].targets[0]]
        shown = class_name if target is not None else ranked[0]
        other = next((c for c in ranked if c != shown), shown)
        return (gr.update(choices=classes, value=shown), view.colour, view.contributions, _info(view),
                explorer.input_image(model, image), gr.update(value=shown), gr.update(value=other))

    @_page_errors
    def compare(image: Any, model: str, class_a: str, class_b: str, method: str):
        image = _path(image)
        classes = explorer.class_names(model)
        a, b = (classes.index(c) if c in classes else None for c in (class_a, class_b))
        va, vb = explorer.class_view(model, image, a), explorer.class_view(model, image, b)
        post = explorer.posthoc_view(model, image, method, a)
        return va.colour, vb.colour, va.contributions, post.colour, f'{_info(va)}\n\n{_info(vb)}\n\n{_info(post)}'

    @_page_errors
    def show_neuron(image: Any, model: str, layer: str, channel: float):
        view = explorer.neuron_view(model, _path(image), layer, int(channel or 0))
        return view.colour, view.contributions, _info(view)

    @_page_errors
    def model_changed(model: str):
        layers, classes = list(explorer.layers(model)), explorer.class_names(model)
        return (gr.update(choices=layers, value=layers[-1] if layers else None),
                gr.update(choices=classes, value=None), gr.update(choices=classes, value=None))

    return SimpleNamespace(explain_api=explain_api, show_class=show_class, compare=compare, show_neuron=show_neuron,
                           model_changed=model_changed)


def _components(explorer: Explorer, title: str) -> SimpleNamespace:
    """The page's layout (inside a `gradio.Blocks`): input column, classes and the class view, the
    *Compare* and *Inner neuron* tabs."""
    import gradio as gr

    names = explorer.names
    gr.Markdown(f'# {title}\nEvery output of a B-cos network is an exact input-dependent linear map, '
                '`logit = W(x) x + b` (Eq. 13). Pick an image and a model: the page shows the top classes, '
                'the colour explanation of a class (a row of W(x), Eq. 15 visualisation) and its '
                'contribution map `W(x) * x` (red: for the class, blue: against).')
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(type='filepath', label='image', sources=['upload', 'clipboard'], elem_id='image',
                             height=240)
            model = gr.Dropdown(names, value=names[0], label='model', elem_id='model')
            run = gr.Button('Explain', variant='primary', elem_id='run')
            examples = demo_images()
            if examples:
                gr.Examples(examples, inputs=image, label='shipped Fashion-MNIST test images')
        with gr.Column(scale=2):
            label = gr.Label(num_top_classes=explorer.topk, label='top classes (sigmoid probability)',
                             elem_id='classes')
            target = gr.Dropdown([], label='class to explain', elem_id='target')
            with gr.Row():
                seen = gr.Image(label='model input', format='png', interactive=False, elem_classes='pixelated')
                colour = gr.Image(label='explanation (Eq. 15 visualisation)', format='png', interactive=False,
                                  elem_id='explanation')
                contrib = gr.Image(label='contributions W(x) * x', format='png', interactive=False,
                                   elem_id='contributions')
            info = gr.Markdown(elem_id='eq13')
    with gr.Tab('Compare'):
        with gr.Row():
            class_a = gr.Dropdown(explorer.class_names(names[0]), label='class A')
            class_b = gr.Dropdown(explorer.class_names(names[0]), label='class B')
            method = gr.Dropdown(list(POST_HOC_CHOICES), value='gradcam', label='post-hoc method (for class A)')
            compare_btn = gr.Button('Compare', elem_id='run-compare')
        with gr.Row():
            a_img, b_img, a_map, p_map = (
                gr.Image(label=text, format='png', interactive=False, elem_classes='pixelated', elem_id=key)
                for text, key in (('B-cos: class A', 'compare-a'),
                                  ('B-cos: class B', 'compare-b'),
                                  ('B-cos contributions: class A', 'compare-contributions'),
                                  ('post-hoc method: class A', 'compare-posthoc')))
        compare_info = gr.Markdown()
    with gr.Tab('Inner neuron'):
        with gr.Row():
            layers = list(explorer.layers(names[0]))
            layer = gr.Dropdown(layers, value=layers[-1] if layers else None, label='layer', elem_id='layer')
            channel = gr.Number(0, precision=0, minimum=0, label='channel')
            neuron_btn = gr.Button('Explain neuron', elem_id='run-neuron')
        with gr.Row():
            n_img = gr.Image(label='explanation', format='png', interactive=False, elem_classes='pixelated',
                             elem_id='neuron')
            n_map = gr.Image(label='contributions', format='png', interactive=False, elem_classes='pixelated',
                             elem_id='neuron-contributions')
        neuron_info = gr.Markdown(elem_id='neuron-info')

    return SimpleNamespace(**{k: v for k, v in locals().items() if isinstance(v, gr.components.Component)})


def build_app(explorer: Explorer, title: str = 'B-cos explanation explorer'):
    """The explorer page for `explorer`'s models, as a `gradio.Blocks` (not launched).

    The *Explain* button is the API endpoint ``explain`` (image, model name) -> (top classes with
    probabilities, colour explanation of the top class); it is batched (``batch=True``): requests that
    arrive together are explained in one call.
    """
    import gradio as gr

    h = _handlers(explorer)
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        c = _components(explorer, title)
        class_outputs = [c.target, c.colour, c.contrib, c.info, c.seen, c.class_a, c.class_b]
        raw = dict(preprocess=False)  # images reach the explorer as files (`_path`)
        private = dict(raw, api_visibility='private')
        c.run.click(h.explain_api, [c.image, c.model], [c.label, c.colour], api_name='explain', batch=True,
                    max_batch_size=8, **raw).success(h.show_class, [c.image, c.model, c.target], class_outputs,
                                                     **private)
        c.image.change(h.explain_api, [c.image, c.model], [c.label, c.colour], batch=True, max_batch_size=8,
                       **private).success(h.show_class, [c.image, c.model, c.target], class_outputs, **private)
        c.target.input(h.show_class, [c.image, c.model, c.target], class_outputs, **private)
        c.model.change(h.model_changed, c.model, [c.layer, c.class_a, c.class_b], **private)
        c.compare_btn.click(h.compare, [c.image, c.model, c.class_a, c.class_b, c.method],
                            [c.a_img, c.b_img, c.a_map, c.p_map, c.compare_info], **private)
        c.neuron_btn.click(h.show_neuron, [c.image, c.model, c.layer, c.channel], [c.n_img, c.n_map, c.neuron_info],
                           **private)
    return app


def serve(models: Sequence[str], host: str = '127.0.0.1', port: int = 7860, topk: int = 5,
          block: bool = True, started: Optional[float] = None):
    """Build the explorer for `models` and launch it on http://host:port; print when the page is
    ready (and how long that took from `started`, default now). ``block=False`` returns the app."""
    import gradio as gr

    t0 = time.perf_counter() if started is None else started
    explorer = Explorer(models, topk=topk)
    explorer.model(explorer.names[0])  # the default model is loaded before the page is served
    app = build_app(explorer)
    app.queue(default_concurrency_limit=4)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True,
               show_error=True, theme=gr.themes.Default(**_FONTS), css=_CSS,
               allowed_paths=[os.path.dirname(p) for p in demo_images()[:1]])
    print(f'timm-bcos serve: ready at http://{host}:{port} in {time.perf_counter() - t0:.1f} s '
          f'(models: {", ".join(explorer.names)})', flush=True)
    if block:
        app.block_thread()
    return app
