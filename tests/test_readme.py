"""
The README's Python examples, copied together into one file as a user would,
type-check under mypy (strict about untyped code, with and without the
mypy_zope plugin) with no type: ignore and no cast, and run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def examples() -> str:
    """
    Every C{```python} block of the README, in order, as one module.
    """
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", text, re.M | re.S)
    return "\n\n".join(blocks)


def zone() -> str:
    """
    The README's C{zone.py}, its one C{```py} block (Twisted's C{--pyzone}
    format: not a module of its own, so not type-checked with the others).
    """
    text = (REPO / "README.md").read_text()
    (block,) = re.findall(r"^```py\n(.*?)^```$", text, re.M | re.S)
    return block


def test_examplesAreWhatTheIssueAsks() -> None:
    """
    The examples hold what the type check is for: a destination-aware
    subclass that overrides C{datagramReceived(self, data, addr, dst)} and
    replies with C{self.transport.write(data, addr, dst)}; no escape hatch.
    """
    source = examples()
    assert "class Aware(udpdst.DestinationDatagramProtocol):" in source
    assert "self, data: bytes, addr: PeerAddress, dst: Destination | None" in source
    assert "self.transport.write(data, addr, dst)" in source
    assert "type: ignore" not in source
    assert not re.search(r"\bcast\(", source)


@pytest.fixture(scope="module")
def examplesFile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("readme") / "readme_examples.py"
    path.write_text(examples())
    return path


@pytest.mark.parametrize("plugin", [True, False], ids=["mypy_zope", "no-plugin"])
def test_examplesTypeCheck(
    examplesFile: Path, plugin: bool, request: pytest.FixtureRequest
) -> None:
    pytest.importorskip(
        "mypy", reason="mypy is in the test extra; pip install -e '.[test]'"
    )
    config = examplesFile.parent / f"mypy-{plugin}.ini"
    config.write_text("[mypy]\n" + ("plugins = mypy_zope:plugin\n" if plugin else ""))
    # pytest's cache keeps mypy's warm between runs; without it, a fresh one.
    store = getattr(request.config, "cache", None)
    name = f"readme-mypy-{plugin}"
    cache = store.mkdir(name) if store is not None else examplesFile.parent / name
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            "--cache-dir",
            str(cache),
            "--disallow-untyped-defs",
            "--check-untyped-defs",
            # A NoReturn call must not hide the examples after it.
            "--warn-unreachable",
            str(examplesFile),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=examplesFile.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 1 source file" in result.stdout


def test_examplesRun(examplesFile: Path) -> None:
    """
    Imported (not run as a script, so nothing listens), the examples build
    their service and their protocol test's assertion holds.
    """
    (examplesFile.parent / "zone.py").write_text(zone())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import runpy, sys; "
            f"ns = runpy.run_path({str(examplesFile)!r}, run_name='readme'); "
            "print(sorted(k for k in ns if not k.startswith('_')))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=examplesFile.parent,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    names = result.stdout
    assert "'application'" in names and "'transport'" in names
