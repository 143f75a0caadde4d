"""
Smoke test of the benchmark: C{bench/run.py --quick} runs, measures every
variant, and udpdst's replies through 127.0.0.2 all come back.

No speed is asserted here: speed goals live in the benchmark's own report.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _benchVariants() -> list[str]:
    """
    The udpdst variants the benchmark runs by default, from bench/run.py.
    """
    spec = importlib.util.spec_from_file_location(
        "bench_run", ROOT / "bench" / "run.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_run", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    return [n for n in module.DEFAULT_VARIANTS if n.startswith(("udpdst-", "py-"))]


UDPDST_VARIANTS = _benchVariants()

pytestmark = [
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="the benchmark is Linux-only"
    ),
    pytest.mark.skipif(
        shutil.which("gcc") is None and shutil.which("cc") is None,
        reason="no C compiler: the benchmark builds its C client with gcc",
    ),
]


@pytest.fixture(scope="module")
def quickRun(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench-out")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--peers",
            "300",
            # A loaded machine can stall a server for a moment: a reply that
            # comes late must count as received, not lost.
            "--timeout-ms",
            "3000",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "latest.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def chartOf(quickRun: tuple[dict, str]) -> Path:
    return (
        Path(quickRun[1].split("JSON: ", 1)[1].split("\n", 1)[0]).parent / "chart.svg"
    )


def test_completes_with_a_table(quickRun: tuple[dict, str]) -> None:
    result, stdout = quickRun
    assert "µs/dgram" in stdout
    assert result["summary"]["twisted"]["received"] > 0
    assert result["records"]
    assert result["summary"]["udpdst-dst4"]["rtt_p50_us_window1"] > 0
    rss = result["memory"]["udpdst-dst4"]["rss_kb"]
    assert len(rss) == 4 and None not in rss


def test_chart(quickRun: tuple[dict, str], chartOf: Path) -> None:
    """
    The run draws its chart (where matplotlib is installed, the bench
    extra): every server is on it, with the run's commit; else it says why
    not.
    """
    stdout = quickRun[1]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "chart: not drawn: matplotlib is missing" in stdout
        return
    assert f"chart: {chartOf}" in stdout
    svg = chartOf.read_text()
    for label in ("stock Twisted listenUDP echo", "C echo, recvmmsg/sendmmsg"):
        assert label in svg
    assert f"commit {quickRun[0]['environment']['git']}" in svg


def test_client_drops_wrong_source_replies(quickRun: tuple[dict, str]) -> None:
    """
    Stock Twisted on 0.0.0.0 answers 127.0.0.2 from 127.0.0.1: the client's
    connected sockets must drop all of it, or the udpdst check below would
    prove nothing.
    """
    check = quickRun[0]["wrong_source_check"]
    assert check["sent"] > 0
    assert check["received"] == 0


@pytest.mark.parametrize("name", UDPDST_VARIANTS)
def test_udpdst_replies_from_the_right_address(
    quickRun: tuple[dict, str], name: str
) -> None:
    result = quickRun[0]
    variant = result["variants"][name]
    assert variant["error"] is None, variant["error"]
    assert variant["target"] == "127.0.0.2"
    summary = result["summary"][name]
    stats = result["server_stats"].get(name)
    assert summary["received"] > 0, (summary, stats)
    assert summary["lost"] == 0, (summary, stats)
    assert summary["bad"] == 0, (summary, stats)
    assert summary["cpu_us_per_dgram_median"] > 0
