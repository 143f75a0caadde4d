"""
What a C{pip install udpdst} gets: a wheel built from this checkout holds
the example config and the units (package data), the licence, and the
twistd plugin, and nothing generated.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
