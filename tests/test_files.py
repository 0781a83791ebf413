"""Atomic writes: whole files for readers and for writers racing on the same path."""

import multiprocessing
from pathlib import Path

import pytest

from lemo_jax.files import is_temporary, write_atomically, write_text_atomically


def _write_many(path: str, letter: str, count: int) -> None:
    for _ in range(count):
        write_text_atomically(Path(path), letter * 100_000)


def test_processes_writing_the_same_path_each_rename_a_whole_file(tmp_path):
    # Two processes (as two hosts of one run) write one file again and again: a shared temporary
    # name made one rename fail with FileNotFoundError and could leave a mix of both writes.
    path = tmp_path / "run_config.json"
    context = multiprocessing.get_context("spawn")
    writers = [
        context.Process(target=_write_many, args=(str(path), letter, 200)) for letter in "ab"
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    text = path.read_text()
    assert text in ("a" * 100_000, "b" * 100_000)
    assert [entry.name for entry in tmp_path.iterdir()] == ["run_config.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "note.json"
    write_text_atomically(path, "old")

    def fail(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(path, fail)
    assert path.read_text() == "old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["note.json"]


def test_temporary_names(tmp_path):
    seen = []
    write_atomically(tmp_path / "x.json", lambda handle: seen.extend(tmp_path.iterdir()))
    assert len(seen) == 1 and is_temporary(seen[0])
    assert not is_temporary(tmp_path / "x.json")
    assert not is_temporary(tmp_path / ".hidden")
    assert not is_temporary(tmp_path / "backup.tmp")
