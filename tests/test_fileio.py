import os
import stat

import pytest

from compress.fileio import atomic_write, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_respects_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "a" / "result.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = atomic_write_text(tmp_path / "x.txt", "old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
