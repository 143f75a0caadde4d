"""
The package's public face: its version, and every advertised name.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from twisted import copyright

import udpdst

REPO = Path(__file__).resolve().parent.parent


def test_version() -> None:
    """
    C{udpdst.__version__} is the version pyproject.toml gives the package.
    """
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert udpdst.__version__ == project["version"]


def test_twistdUdpdstVersion() -> None:
    """
    C{twistd udpdst --version} names udpdst's version, then Twisted's.
    """
    twistd = Path(sys.executable).with_name("twistd")
    out = subprocess.run(
        [str(twistd), "udpdst", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"udpdst {udpdst.__version__} (Twisted "), out.stdout


def test_udpdstVersion() -> None:
    """
    C{udpdst --version} exits 0 and prints what C{twistd udpdst --version}
    prints.
    """
    bindir = Path(sys.executable).parent
    tool, twistd = (
        subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/")
        for command in (
            [str(bindir / "udpdst"), "--version"],
            [str(bindir / "twistd"), "udpdst", "--version"],
        )
    )
    assert tool.returncode == 0, tool.stderr
    assert tool.stdout == twistd.stdout
    assert tool.stdout == f"udpdst {udpdst.__version__} (Twisted {copyright.version})\n"


def test_everyNameLoads() -> None:
    """
    Each name in C{__all__} loads, in a fresh interpreter, from a package
    whose import pulls in no reactor.
    """
    script = (
        "import sys, udpdst\n"
        "assert 'twisted.internet.reactor' not in sys.modules\n"
        "for name in udpdst.__all__: getattr(udpdst, name)\n"
        "assert set(udpdst.__all__) <= set(dir(udpdst))\n"
        "assert 'twisted.internet.reactor' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.stdout.strip() == "ok", out.stderr
