"""A Hugging Face Space folder that serves the explorer for one published model (`publish(space=True)`).

The Space runs ``python app.py`` with the Gradio SDK: the app loads ``hf-hub:ORG/NAME`` through timm's
own Hub path and serves `timm_bcos.app.ui` on the address and port the Space gives in
``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` (127.0.0.1:7860 elsewhere).
"""
from __future__ import annotations

from .._utils import OutputFolder
from ..version import __version__

__all__ = ['SPACE_FILES', 'write_space']

SPACE_FILES = ('app.py', 'requirements.txt', 'README.md')

_APP = '''"""Hugging Face Space: the timm-bcos explanation explorer for {repo_id}."""
import os

from timm_bcos.app.ui import serve

MODEL = 'hf-hub:{repo_id}'

if __name__ == '__main__':
    serve([MODEL], host=os.environ.get('GRADIO_SERVER_NAME', '127.0.0.1'),
          port=int(os.environ.get('GRADIO_SERVER_PORT', '7860')))
'''

_README = '''---
title: B-cos explorer
emoji: 🔍
colorFrom: indigo
colorTo: red
sdk: gradio
sdk_version: {gradio}
app_file: app.py
pinned: false
models:
- {repo_id}
tags:
- b-cos
- explainability
- timm
---

# B-cos explanation explorer: `{repo_id}`

Every output of this B-cos network is an exact input-dependent linear map of its input,
`logit = W(x) x + b` (Böhle, Fritz, Schiele, CVPR 2022, Eq. 13). Upload an image to see the top
classes, the colour explanation of any class, its contribution map and Eq. 13's error, two classes or
a post-hoc method side by side, and the explanation of an inner neuron.

Model: [{repo_id}](https://huggingface.co/{repo_id}), loaded with
`timm.create_model('hf-hub:{repo_id}', pretrained=True)` after `import timm_bcos`.
Run it locally: `pip install -r requirements.txt && python app.py`, or `timm-bcos serve --model hf-hub:{repo_id}`.
'''


def write_space(folder: OutputFolder, repo_id: str) -> None:
    """Write the Space files (`SPACE_FILES`) for the model ``repo_id`` into `folder`.

    ``requirements.txt`` pins this timm-bcos version, and the torch / timm / Gradio versions it runs
    with here (the Space's ``sdk_version`` is that Gradio)."""
    import gradio
    import timm
    import torch

    pin = f'timm-bcos=={__version__}'
    requirements = (f'# the explorer and the model code; to run an unreleased version, replace the first line\n'
                    f'# with the package\'s git URL: git+https://.../timm-bcos@COMMIT\n'
                    f'{pin}\ntorch=={torch.__version__.split("+")[0]}\ntimm=={timm.__version__}\n'
                    f'gradio=={gradio.__version__}\n')
    texts = dict(zip(SPACE_FILES, (_APP.format(repo_id=repo_id), requirements,
                                   _README.format(repo_id=repo_id, gradio=gradio.__version__))))
    for name, text in texts.items():  # `publish` writes the folder in a new temporary place, then moves it
        folder.path(name).write_text(text, encoding='utf-8')
