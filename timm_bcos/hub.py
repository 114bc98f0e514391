"""Publish B-cos models to the Hugging Face Hub with a generated model card.

`publish` writes the folder a Hub repo needs -- timm's ``config.json``, ``model.safetensors`` (never
a pickle), a ``README.md`` model card rendered from ``assets/model_card.md`` with the run's real
numbers, and an explanation PNG -- then uploads it with ``huggingface_hub`` (or stops there with
``dry_run=True``). The repo loads back with ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Union

from torch import nn

from ._utils import ASSETS, OWNER_FILE, OutputFolder, OutputFolderError, remove_owned_folder
from .data import example_images
from .models.export import save_pretrained

if TYPE_CHECKING:  # huggingface_hub is imported where it is used
    from huggingface_hub import ModelCard

__all__ = ['HubPublishError', 'card_metrics', 'check_repo_id', 'publish', 'pull', 'render_model_card']

_TEMPLATE = str(ASSETS / 'model_card.md')
_EXPLANATION_PNG = 'explanation.png'


class HubPublishError(RuntimeError):
    """Publishing failed: no token, no network, or no write access to the repo."""


def _load(model_or_dir: Union[nn.Module, str, os.PathLike]) -> tuple:
    """The model and the run's results (``results.json`` of a training run folder, if any)."""
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir.eval(), {}
    import timm

    path = os.fspath(model_or_dir)
    if not os.path.exists(os.path.join(path, 'config.json')):
        raise FileNotFoundError(f'{path} is not a model folder: no config.json (expected timm save_for_hf output '
                                f'or a timm-bcos train run)')
    results_path = os.path.join(path, 'results.json')
    with open(results_path) if os.path.exists(results_path) else open(os.devnull) as f:
        results = json.loads(f.read() or '{}')
    return timm.create_model(f'local-dir:{path}', pretrained=True).eval(), card_metrics(results)


def card_metrics(results: Dict[str, Any]) -> Dict[str, Any]:
    """The card's numbers from a run's ``results.json``: `timm_bcos.training`'s (metrics, history,
    recipe, data, config) or an already flat dict of metrics."""
    if not isinstance(results.get('metrics'), dict):
        return dict(results)
    m, history = results['metrics'], results.get('history') or []
    config, recipe, data = results.get('config') or {}, results.get('recipe') or {}, results.get('data') or {}
    out = dict(test_accuracy=m.get('test_acc'), test_loss=m.get('test_loss'), test_images=m.get('test_images'),
               epochs=m.get('epochs_completed'))
    if history:
        out['train_seconds'] = round(sum(r.get('seconds', 0.0) for r in history), 1)
        out['train_images_per_s'] = round(sum(r.get('images_per_s', 0.0) for r in history) / len(history), 1)
    env = results.get('environment') or {}
    if env:
        out['hardware'] = f'{env.get("num_processes", 1)} process(es) on {env.get("device", "?")}'
    out['dataset'] = config.get('data') or data.get('description')
    out['recipe'] = dict(optimizer=recipe.get('optimizer'), lr=recipe.get('effective_lr'),
                         batch=recipe.get('images_per_step'), epochs=config.get('epochs'),
                         schedule=recipe.get('schedule'), warmup_epochs=config.get('warmup_epochs'),
                         loss=recipe.get('loss'), augment=config.get('augment'), img_size=data.get('img_size'),
                         mixed_precision=config.get('mixed_precision'), seed=config.get('seed'))
    out['recipe'] = {k: v for k, v in out['recipe'].items() if v is not None}
    return {k: v for k, v in out.items() if v is not None}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f'{value:.4g}' if math.isfinite(value) else 'n/a'
    return str(value)


def render_model_card(model: nn.Module, repo_id: str, metrics: Optional[Dict[str, Any]] = None,
                      explanation_png: Optional[str] = _EXPLANATION_PNG) -> 'ModelCard':
    """The model card: YAML metadata (library timm, tags, license, datasets, metrics) and a body
    with the architecture, B-cos design, recipe, results, usage code and the paper's citation."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metrics = dict(metrics or {})
    cfg = model.pretrained_cfg
    bcos = getattr(model, 'bcos_cfg', {})
    dataset = metrics.pop('dataset', None)
    recipe = metrics.pop('recipe', {}) or {}
    accuracy = metrics.get('test_accuracy')
    name = repo_id.split('/')[-1]
    eval_results = None
    if accuracy is not None and dataset:
        eval_results = [EvalResult(task_type='image-classification', dataset_type=dataset, dataset_name=dataset,
                                   metric_type='accuracy', metric_value=float(accuracy))]
    data = ModelCardData(
        library_name='timm', license=cfg.get('license', 'apache-2.0'), pipeline_tag='image-classification',
        tags=['image-classification', 'interpretability', 'b-cos', 'timm'],
        datasets=[dataset] if dataset else None, metrics=['accuracy'] if accuracy is not None else None,
        model_name=name, eval_results=eval_results)
    labels = cfg.get('label_names')
    return ModelCard.from_template(
        data, template_path=_TEMPLATE, title=name, repo_id=repo_id, architecture=cfg.get('architecture'),
        params=f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M', b=bcos.get('b', '-'),
        max_out=bcos.get('max_out', '-'), norm=bcos.get('norm', '-'), head=bcos.get('head', '-'),
        logit_bias=_fmt(bcos.get('logit_bias')), input_size=tuple(cfg.get('input_size', ())),
        num_classes=getattr(model, 'num_classes', cfg.get('num_classes')),
        label_names=', '.join(labels) if labels else None, dataset=dataset or 'not recorded',
        recipe={k: _fmt(v) for k, v in recipe.items()},
        results={k: _fmt(v) for k, v in metrics.items()} or {'not evaluated': '-'},
        bcosified=_bcosified_text(bcos.get('bcosified')), explanation_png=explanation_png)


def _bcosified_text(options: Optional[Dict[str, Any]]) -> Optional[str]:
    """The card's line for a B-cosified model (`timm_bcos.bcosify`): what it was made from, and how."""
    if not options:
        return None
    how = ', '.join(f'{k}={v}' for k, v in options.items() if k not in ('architecture', 'mean', 'std'))
    return (f"from a trained `{options.get('architecture')}` with its weights (B-cosification, Arya et al., NeurIPS "
            f"2024; `timm_bcos.bcosify`: {how})")


def _explanation_png(model: nn.Module, images: Sequence[str], path: str) -> float:
    """Save the explanation of `images`' top classes to `path`; returns its `eq13_error`."""
    from .data import load_images
    from .explain import explain

    e = explain(model, load_images(model, images), k=min(2, getattr(model, 'num_classes', 2)))
    e.save(path)
    return e.check()


def publish(
        model_or_dir: Union[nn.Module, str, os.PathLike],
        repo_id: str,
        *,
        metrics: Optional[Dict[str, Any]] = None,
        images: Optional[Sequence[str]] = None,
        private: bool = False,
        token: Optional[str] = None,
        dry_run: bool = False,
        out_dir: Optional[str] = None,
        weights: bool = True,
        endpoint: Optional[str] = None,
        space: bool = False,
        space_dir: Optional[str] = None,
) -> str:
    """Write a Hub repo folder for a B-cos model and upload it.

    Args:
        model_or_dir: a model, or a folder with ``config.json`` + ``model.safetensors`` (a training run:
            its ``results.json`` fills the card).
        repo_id: ``ORG/NAME`` on the Hub.
        metrics: numbers for the card (``test_accuracy``, ``pointing_game``, ``train_seconds``, ...,
            ``dataset`` and a ``recipe`` dict); merged over the run's results. The card also reports
            the ``eq13_error`` of its example explanation.
        images: example images for the card's explanation PNG (default: `example_images` of the
            model's classes: the shipped Fashion-MNIST images, test digits, or none).
        private: create the repo private.
        token: Hub token (default: ``HF_TOKEN`` or the saved login).
        dry_run: only write the folder (to `out_dir`, or a temporary folder whose path is returned).
        out_dir: where the folder is written: a new or empty folder, or publish's own earlier output,
            which is replaced atomically; a folder holding anything else is refused.
        weights: include ``model.safetensors`` (False: card and config only, e.g. for ``hub_cards/``).
        endpoint: Hub endpoint (default: ``HF_ENDPOINT``).
        space: also write a Hub Space folder serving the explorer for this model
            (`timm_bcos.app.space`: ``app.py``, ``requirements.txt``, ``README.md``) to `space_dir`
            (default: the model folder's path + ``-space``), and upload it to the Space ``repo_id``.
        space_dir: where the Space folder goes (same rules as `out_dir`).

    Returns:
        The folder written (dry run) or the URL of the commit (the model's; the Space's follows on a
        second line with `space`).
    """
    check_repo_id(repo_id)
    model, results = _load(model_or_dir)
    card_metrics = {**results, **(metrics or {})}
    final = Path(out_dir).absolute() if out_dir else Path(tempfile.mkdtemp(prefix='timm-bcos-publish-'))
    space_final = Path(space_dir).absolute() if space_dir else final.with_name(final.name + '-space')
    for where, kind in [(final, 'publish')] + ([(space_final, 'publish-space')] if space else []):
        foreign = OutputFolder(where, kind).foreign()
        if foreign:
            raise OutputFolderError(f'{where} holds files publish did not write ({", ".join(foreign[:5])}): publish '
                                    f'replaces its whole folder, so it will not write there; choose a new or empty '
                                    f'folder')

    def repo_folder(folder: OutputFolder) -> None:
        with tempfile.TemporaryDirectory() as examples:
            found = example_images(model.pretrained_cfg.get('label_names'), examples) if images is None else images
            _write_repo_folder(folder, model, repo_id, card_metrics, found, weights)

    _write_folder(final, 'publish', repo_folder)
    if space:
        from .app.space import write_space

        _write_folder(space_final, 'publish-space', lambda folder: write_space(folder, repo_id))
    if dry_run:
        return str(final) + (f'\n{space_final}' if space else '')
    url = _upload(str(final), repo_id, private=private, token=token, endpoint=endpoint)
    if space:
        url += '\n' + _upload(str(space_final), repo_id, private=private, token=token, endpoint=endpoint,
                               repo_type='space')
    return url


def _write_folder(final: Path, kind: str, write: Callable[[OutputFolder], None]) -> None:
    """`write` the folder's files into a new temporary folder next to `final`, then put it in place of
    `final` (absent, empty, or `kind`'s own earlier output): readers never see half a folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f'.{kind}-', dir=final.parent))
    try:
        write(OutputFolder(work, kind))
        _replace_folder(work, final)
    except BaseException:
        with contextlib.suppress(OSError):  # never hide the error that got us here
            remove_owned_folder(work)  # the files written so far into this new temporary folder
        raise


def check_repo_id(repo_id: str) -> None:
    """`repo_id` must be ``ORG/NAME`` as the Hub names repos (checked before anything is written)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if not isinstance(repo_id, str) or repo_id.count('/') != 1:
            raise HFValidationError('expected exactly one "/"')
    except HFValidationError as e:
        raise ValueError(f'repo_id must be ORG/NAME (letters, digits, "-", "_", "."), got {repo_id!r}: {e}') from e


def _write_repo_folder(folder: OutputFolder, model: nn.Module, repo_id: str, metrics: Dict[str, Any],
                       images: Sequence[str], weights: bool) -> None:
    """timm's config.json (+ model.safetensors), the explanation PNG and the model card, in `folder`."""
    folder.path('config.json')
    if weights:
        folder.path('model.safetensors')
    save_pretrained(model, str(folder.root))
    if not weights:
        os.remove(folder.root / 'model.safetensors')
    png = None
    if images:
        metrics.setdefault('eq13_error', _explanation_png(model, images, str(folder.path(_EXPLANATION_PNG))))
        png = _EXPLANATION_PNG
    render_model_card(model, repo_id, metrics, png).save(str(folder.path('README.md')))


def _replace_folder(work: Path, final: Path) -> None:
    """Put the finished folder `work` in place of `final` (absent, empty, or publish's own output)."""
    if not final.exists():
        os.replace(work, final)
        return
    old = final.with_name(f'.{final.name}.old-{os.getpid()}')
    os.replace(final, old)
    os.replace(work, final)
    remove_owned_folder(old)  # publish's own previous output: only the files it lists


def _upload(folder: str, repo_id: str, *, private: bool, token: Optional[str], endpoint: Optional[str],
            repo_type: str = 'model') -> str:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = token or os.environ.get('HF_TOKEN') or get_token()
    if not token:
        raise HubPublishError('no Hugging Face token: pass token=..., set HF_TOKEN, or log in with `hf auth login`. '
                              f'The repo folder was written to {folder} (dry_run=True / --dry-run only writes it).')
    api = HfApi(endpoint=endpoint, token=token)
    try:
        space = dict(space_sdk='gradio') if repo_type == 'space' else {}
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, **space)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type=repo_type, ignore_patterns=[OWNER_FILE],
                                 commit_message=f'Upload B-cos {"explorer" if space else "model"} (timm-bcos)')
    except HfHubHTTPError as e:
        status = getattr(e.response, 'status_code', None)
        if status in (401, 403):
            raise HubPublishError(f'no write access to {repo_id} on {api.endpoint} (HTTP {status}): the repo belongs '
                                  f'to someone else or the token lacks write rights. Folder: {folder}') from e
        raise HubPublishError(f'the Hub refused the upload of {repo_id} (HTTP {status}): {e}. Folder: {folder}') from e
    except Exception as e:
        if not _is_connection_error(e):
            raise
        raise HubPublishError(f'cannot reach the Hub at {api.endpoint}: {type(e).__name__}: {e}. dry_run=True '
                              f'(--dry-run) writes the folder without uploading; it is at {folder}.') from e
    return str(info.commit_url if hasattr(info, 'commit_url') else info)


def _is_connection_error(e: BaseException) -> bool:
    """No network / DNS / refused connection, whatever HTTP client huggingface_hub uses."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, OSError) or bool(names & {'ConnectError', 'ConnectTimeout', 'NetworkError', 'TransportError',
                                                    'ConnectionError'})


def pull(repo_id: str, out_dir: str, revision: Optional[str] = None) -> str:
    """Download a published repo's files (config, weights, card) to `out_dir`."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, local_dir=out_dir)
