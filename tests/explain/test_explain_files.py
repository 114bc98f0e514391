"""explain_images: one PNG per image, never replacing another explanation, an input or a user's file."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import timm_bcos
from timm_bcos.explain import explain_images


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model('bcos_simple_cifar_tiny', num_classes=10).eval()


def _image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((32, 32, 3)) * 255).astype('uint8')).save(path)
    return str(path)


def test_images_of_the_same_name_get_their_own_png(model, tmp_path):
    paths = [_image(tmp_path / 'a' / 'x.png', 0), _image(tmp_path / 'b' / 'x.png', 1), _image(tmp_path / 'x-2.png', 2)]
    results = explain_images(model, paths, tmp_path / 'out')
    pngs = [r['png'] for r in results]
    assert [p.split('/')[-1] for p in pngs] == ['x.png', 'x-2.png', 'x-2-2.png']
    assert len({open(p, 'rb').read() for p in pngs}) == 3  # three different explanations, none lost
    saved = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert [(r['image'], r['png']) for r in saved] == list(zip(paths, pngs))


def test_an_input_is_never_replaced_by_its_explanation(model, tmp_path):
    out = tmp_path / 'out'
    explain_images(model, [_image(tmp_path / 'first.png', 0)], out)  # out is now explain's own folder
    path = _image(out / 'x.png', 1)  # the user keeps an image there, under the output name
    before = open(path, 'rb').read()
    with pytest.raises(timm_bcos.OutputFolderError, match='replace the input image'):
        explain_images(model, [path], out)
    assert open(path, 'rb').read() == before


def test_a_folder_with_the_users_files_is_refused(model, tmp_path):
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(timm_bcos.OutputFolderError, match='not written by timm-bcos'):
        explain_images(model, [_image(tmp_path / 'in' / 'y.png', 0)], tmp_path)
    assert (tmp_path / 'notes.txt').read_text() == 'mine' and not (tmp_path / 'y.png').exists()


def test_a_users_file_in_an_own_folder_is_not_replaced(model, tmp_path):
    out = tmp_path / 'out'
    explain_images(model, [_image(tmp_path / 'first.png', 0)], out)
    (out / 'y.png').write_text('mine')  # not an explanation: written by the user
    with pytest.raises(timm_bcos.OutputFolderError, match='y.png exists and was not written'):
        explain_images(model, [_image(tmp_path / 'in' / 'y.png', 1)], out)
    assert (out / 'y.png').read_text() == 'mine'
    explain_images(model, [_image(tmp_path / 'first.png', 0)], out)  # its own files: written again
