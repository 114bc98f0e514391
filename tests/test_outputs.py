"""The library's file-safety rules (`timm_bcos._utils`): where it writes, and what it may delete."""
import pytest

from timm_bcos._utils import OutputFolder, OutputFolderError, remove_owned, remove_owned_folder


def test_only_listed_files_are_ever_deleted(tmp_path):
    folder = OutputFolder(tmp_path / 'run', 'train')
    folder.claim(['checkpoint', 'metrics.jsonl'])
    checkpoint = OutputFolder(folder.root / 'checkpoint', 'checkpoint')
    checkpoint.path('state.json').write_text('{}')
    (checkpoint.root / 'yours.txt').write_text('a file put into the listed folder by its user')
    (folder.root / 'metrics.jsonl').write_text('')
    (folder.root / 'notes.txt').write_text('mine')
    with pytest.raises(OutputFolderError, match=r'did not write \(yours.txt\)'):
        remove_owned(folder.root / 'checkpoint')  # a listed folder goes only through its own listing
    assert sorted(p.name for p in checkpoint.root.iterdir()) == ['yours.txt']
    (checkpoint.root / 'yours.txt').unlink()
    remove_owned(folder.root / 'checkpoint')  # now empty
    remove_owned(folder.root / 'metrics.jsonl')
    remove_owned(folder.root / 'metrics.jsonl')  # already gone: nothing to do
    with pytest.raises(OutputFolderError, match='notes.txt was not written by timm-bcos'):
        remove_owned(folder.root / 'notes.txt')
    (tmp_path / 'plain').mkdir()
    (tmp_path / 'plain' / 'data').mkdir()
    with pytest.raises(OutputFolderError, match='not deleting'):
        remove_owned(tmp_path / 'plain' / 'data')  # no owner file at all
    assert sorted(p.name for p in folder.root.iterdir()) == ['.timm-bcos.json', 'notes.txt']
    assert (tmp_path / 'plain' / 'data').is_dir()


def test_another_commands_folder_is_refused(tmp_path):
    OutputFolder(tmp_path / 'x', 'explain').claim(['a.png'])
    with pytest.raises(OutputFolderError, match='output of timm-bcos explain, not of publish'):
        OutputFolder(tmp_path / 'x', 'publish')


def test_a_folder_is_deleted_only_when_it_holds_nothing_but_the_librarys_files(tmp_path):
    folder = OutputFolder(tmp_path / 'card', 'publish')
    folder.path('README.md').write_text('card')
    (folder.root / 'mine.txt').write_text('mine')
    with pytest.raises(OSError):
        remove_owned_folder(folder.root)
    assert sorted(p.name for p in folder.root.iterdir()) == ['mine.txt']  # its own files gone, the user's kept
    (folder.root / 'mine.txt').unlink()
    folder.path('README.md').write_text('card')
    remove_owned_folder(folder.root)
    assert not folder.root.exists()
