"""
What a C{pip install udpdst} gets: a wheel built from this checkout holds
the example config and the units (package data), the licence, and the
twistd plugin, and nothing generated; a default editable install shows twistd
the plugins.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: twistd, run by a venv without Twisted's scripts of its own.
TWISTD = (
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("udpdst-*.whl")
    return zipfile.ZipFile(built)


def test_wheelShipsDataLicenceAndPlugin(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for data in ("udpdst.toml", "udpdst.service", "udpdst@.service", "udpdst.socket"):
        assert f"udpdst/data/{data}" in names
        # The installed copy is the one in the checkout.
        assert (
            wheel.read(f"udpdst/data/{data}")
            == (ROOT / "udpdst" / "data" / data).read_bytes()
        )
    assert "twisted/plugins/udpdst_plugin.py" in names
    # Every module of the checkout, the service's sub-package included.
    for module in (ROOT / "udpdst").rglob("*.py"):
        assert module.relative_to(ROOT).as_posix() in names
    assert not [n for n in names if n.startswith("twisted/") and "plugin" not in n]
    assert not [n for n in names if "dropin.cache" in n or "__pycache__" in n]
    (licence,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")] or [
        n for n in names if n.endswith(".dist-info/LICENSE")
    ]
    assert wheel.read(licence) == (ROOT / "LICENSE").read_bytes()
    assert b"MIT License" in wheel.read(licence)


def test_metadata(wheel: zipfile.ZipFile) -> None:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = wheel.read(name).decode()
    assert "Provides-Extra: metrics" in metadata
    assert "Requires-Dist: prometheus_client" in metadata.replace("-client", "_client")
    # The library and the udpdst command (udpdst check included) need
    # nothing else at run time; everything more is an extra.
    required = sorted(
        line.split()[1].split(">")[0].split("=")[0].lower()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    )
    assert required == ["twisted", "zope.interface"], required


def test_defaultEditableInstallShowsThePlugins(tmp_path: Path) -> None:
    """
    A default C{pip install -e .} (no compat mode asked for) shows twistd the
    service plugin and the reactors: twistd finds plugins on C{sys.path}.

    The editable install is of a copy of the checkout, into a new venv that
    reads Twisted from this one's site-packages (a path line, so this venv's
    own install of udpdst is not seen).
    """
    source = tmp_path / "checkout"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "dropin.cache")
    for folder in ("udpdst", "twisted"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    ours = sysconfig.get_path("purelib")
    Path(purelib, "deps.pth").write_text(ours + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr

    def twistd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), "-c", TWISTD, *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )

    version = twistd("udpdst", "--version")
    assert version.returncode == 0, version.stdout + version.stderr
    assert version.stdout.startswith("udpdst 0"), version.stdout
    reactors = twistd("--help-reactors")
    assert "udpdst-asyncio" in reactors.stdout, reactors.stdout + reactors.stderr
    where = subprocess.run(
        [str(python), "-c", "import udpdst; print(udpdst.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert where.stdout.strip() == str(source / "udpdst" / "__init__.py")
