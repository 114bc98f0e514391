"""The library's file-safety rules (`timm_bcos._utils`): where it writes, and what it may delete."""
import pytest

from timm_bcos._utils import OutputFolder, OutputFolderError, remove_owned


def test_only_listed_files_are_ever_deleted(tmp_path):
    folder = OutputFolder(tmp_path / 'run', 'train')
    folder.claim(['checkpoint', 'metrics.jsonl'])
    (folder.root / 'checkpoint').mkdir()
    (folder.root / 'checkpoint' / 'state.json').write_text('{}')
    (folder.root / 'metrics.jsonl').write_text('')
    (folder.root / 'notes.txt').write_text('mine')
    remove_owned(folder.root / 'checkpoint')
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
