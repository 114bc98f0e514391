"""Reading image files: every PIL mode as the right RGB image, or an error naming the file."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from timm_bcos.cli import main as cli
from timm_bcos.data import build_datasets, open_image


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / 'g16.png')
    assert Image.open(tmp_path / 'g16.png').mode == 'I;16'
    rgb = np.asarray(open_image(tmp_path / 'g16.png'))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert abs(rgb.mean() - 127.5) < 1 and (rgb == 255).mean() < 0.01  # PIL's convert('RGB') made 98.6% white


def test_transparency_is_composited_over_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[:2, :, 3] = 255  # opaque top half, transparent bottom half
    rgba[2, :, 3] = 128
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
    rgb = np.asarray(open_image(tmp_path / 'a.png'))
    assert (rgb[:2, :, 0] == 200).all() and (rgb[3] == 0).all() and (rgb[2, :, 0] == 100).all()
    pal = Image.fromarray(np.array([[0, 1], [1, 1]], np.uint8), 'P')
    pal.putpalette([255, 255, 255, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / 'p.png', transparency=0)
    assert np.asarray(open_image(tmp_path / 'p.png'))[0, 0].tolist() == [0, 0, 0]  # the transparent white pixel


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / 'notes.png').write_text('not an image')
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, 'JPEG')
    (tmp_path / 'cut.jpg').write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    Image.fromarray(np.full((4, 4), 3.0, np.float32), 'F').save(tmp_path / 'f.tif')
    for name, why in (('notes.png', 'cannot identify'), ('cut.jpg', 'truncated'), ('f.tif', r'F pixel values in')):
        with pytest.raises(ValueError, match=rf'{name}: cannot read the image .*{why}'):
            open_image(tmp_path / name)
    with pytest.raises(FileNotFoundError, match='missing.png'):
        open_image(tmp_path / 'missing.png')


def test_cli_names_a_truncated_jpeg_in_one_line(tmp_path, capsys):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, 'JPEG')
    (tmp_path / 'cut.jpg').write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    with pytest.raises(SystemExit) as e:
        cli(['explain', str(tmp_path / 'cut.jpg'), '--model', 'bcos_simple_cifar_tiny', '--out', str(tmp_path / 'o')])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count('\n') == 1 and 'cut.jpg: cannot read the image' in err


def _folder(tmp_path, classes):
    for c, n in classes.items():
        (tmp_path / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / c / f'{i}.png')
    return tmp_path


def test_image_folder_refuses_an_empty_class_and_skips_a_corrupt_file_by_name(tmp_path):
    with pytest.raises(ValueError, match=r'empty_class: a class folder without images'):
        build_datasets(str(_folder(tmp_path / 'a', dict(cat=3, dog=3, empty_class=0))), 8)
    root = _folder(tmp_path / 'b', dict(cat=4, dog=4))
    (root / 'dog' / '3.png').write_bytes(b'\x89PNG broken')
    data = build_datasets(str(root), 8, augment=False, val_fraction=0.25)
    (split, index), = [(s, i) for s in (data.train, data.test) for i, (p, _) in enumerate(s.samples)
                       if p.endswith('dog/3.png')]
    with pytest.warns(UserWarning, match=r'dog/3.png: cannot read the image.*skipped'):
        image, label = split[index]
    _, following_label = split.samples[(index + 1) % len(split.samples)]
    assert label == following_label and torch.equal(image, split[(index + 1) % len(split.samples)][0])
