"""The one rule for the service's files (esem.trusted_path), on real directories."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from esem.trusted_path import (
    UntrustedPath,
    open_trusted_dir,
    read_trusted_file,
    trusted_dir,
    trusted_uids,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to nobody")
NOBODY = 65534


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp (sticky, root's: allowed on the way)."""
    with tempfile.TemporaryDirectory(prefix="esem-tp-") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_plain_path_is_trusted_and_its_descriptor_is_that_directory(base: Path) -> None:
    (base / "a" / "b").mkdir(parents=True)
    with trusted_dir(base / "a" / "b") as fd:
        assert os.path.samestat(os.fstat(fd), (base / "a" / "b").stat())


def test_sticky_root_tmp_on_the_way_is_allowed_but_not_as_the_directory(base: Path) -> None:
    assert _mode(Path("/tmp")) & stat.S_ISVTX
    with trusted_dir(base):  # /tmp is on the way
        pass
    with pytest.raises(UntrustedPath, match=r"^/tmp is writable by others"):
        open_trusted_dir("/tmp")


def test_symlink_anywhere_is_refused(base: Path) -> None:
    (base / "real" / "inner").mkdir(parents=True)
    (base / "link").symlink_to(base / "real")
    for path in (base / "link", base / "link" / "inner"):
        with pytest.raises(UntrustedPath, match=rf"{base}/link is a symbolic link"):
            open_trusted_dir(path)


def test_component_of_another_uid_is_refused(base: Path) -> None:
    (base / "theirs" / "mine").mkdir(parents=True)
    os.chown(base / "theirs", NOBODY, NOBODY)
    with pytest.raises(UntrustedPath, match=r"theirs belongs to uid 65534, not to root"):
        open_trusted_dir(base / "theirs" / "mine")
    # The same directory is trusted by the uid that owns it.
    with trusted_dir(base / "theirs", trusted_uids(NOBODY)):
        pass


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_group_or_other_writable_component_is_refused(base: Path, mode: int) -> None:
    (base / "open" / "inner").mkdir(parents=True)
    os.chmod(base / "open", mode)
    # Sticky helps only a root-owned directory on the way (this one is root's: 1777 on
    # the way is allowed, as /tmp is; as the last component nothing writable is).
    if mode & stat.S_ISVTX:
        with trusted_dir(base / "open" / "inner"):
            pass
        os.chown(base / "open", NOBODY, 0)
        with pytest.raises(UntrustedPath, match="belongs to uid 65534"):
            open_trusted_dir(base / "open" / "inner")
    else:
        with pytest.raises(UntrustedPath, match=r"open is writable by others"):
            open_trusted_dir(base / "open" / "inner")
    os.chown(base / "open", 0, 0)
    with pytest.raises(UntrustedPath, match=r"open is writable by others"):
        open_trusted_dir(base / "open")


def test_dotdot_and_relative_paths_name_the_real_directory(base: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    (base / "a").mkdir()
    (base / "b").mkdir()
    monkeypatch.chdir(base / "a")
    with trusted_dir("../b") as fd:
        assert os.path.samestat(os.fstat(fd), (base / "b").stat())


def test_create_mode_makes_missing_components(base: Path) -> None:
    with trusted_dir(base / "x" / "y", create_mode=0o750):
        pass
    assert (base / "x" / "y").is_dir()
    with pytest.raises(FileNotFoundError, match="no such directory"):
        open_trusted_dir(base / "nothing" / "here")


def test_files_follow_the_same_rule(base: Path) -> None:
    key = base / "k.pub"
    key.write_text("abc\n")
    assert read_trusted_file(base, "k.pub") == b"abc\n"
    os.chmod(key, 0o666)
    with pytest.raises(UntrustedPath, match="writable by others"):
        read_trusted_file(base, "k.pub")
    os.chmod(key, 0o644)
    os.chown(key, NOBODY, NOBODY)
    with pytest.raises(UntrustedPath, match="belongs to uid 65534"):
        read_trusted_file(base, "k.pub")
    key.unlink()
    (base / "target").write_text("secret")
    key.symlink_to(base / "target")
    with pytest.raises(UntrustedPath, match="symbolic link"):
        read_trusted_file(base, "k.pub")
    key.unlink()
    os.mkfifo(key)  # would block a reader forever if opened for reading without care
    with pytest.raises(UntrustedPath, match="not a regular file"):
        read_trusted_file(base, "k.pub")
