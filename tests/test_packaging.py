"""Packaging: the sdist and the wheel are built for real (``python -m build``, no build
isolation, so the test needs no network) from a copy of this source tree, and their
contents and metadata are read back: the licence file and SPDX expression, one version
(the one ``esem.__version__`` says), classifiers, no invented project URLs, and an sdist
that carries the docs, the protocol and the tests.
"""

from __future__ import annotations

import email
import email.message
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import esem

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                              ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis",
                              "target")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel) built from a copy of the tree (the build leaves nothing here)."""
    pytest.importorskip("build")
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src-tree"
    shutil.copytree(ROOT, src, ignore=SKIP)
    out = tmp / "dist"
    done = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel",
                           "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,) = out.glob("esem-*.tar.gz")
    (wheel,) = out.glob("esem-*.whl")
    return sdist, wheel


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(name))


def test_license_file_matches_the_declared_licence() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the esem authors" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"  # an SPDX expression, not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])


def test_the_version_has_one_source() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "esem.__version__"}


def test_wheel_metadata(built: tuple[Path, Path]) -> None:
    _, wheel = built
    meta = _wheel_metadata(wheel)
    assert meta["Version"] == esem.__version__
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    classifiers = meta.get_all("Classifier") or []
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    # the project has no public homepage or tracker: no URL may point at one
    assert meta.get_all("Project-URL") is None and meta["Home-page"] is None
    requires = meta.get_all("Requires-Dist") or []
    assert any(r.startswith("rich") and "extra" not in r for r in requires)
    assert any(r.startswith("matplotlib") and 'extra == "bench"' in r for r in requires)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "esem/cli.py" in names and "esem/tables.py" in names


def test_sdist_carries_docs_protocol_license_and_tests(built: tuple[Path, Path]) -> None:
    sdist, _ = built
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for required in ("LICENSE", "README.md", "PROTOCOL.md", "pyproject.toml",
                     "docs/design.md", "docs/vault.md", "tests/conftest.py",
                     "tests/test_packaging.py", "tests/bench/test_bench.py",
                     "src/esem/__init__.py"):
        assert required in names, required
    tests_here = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")}
    assert tests_here <= names, sorted(tests_here - names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
