#!/usr/bin/env python3
"""
Draw a benchmark run as one chart: replies per second and server CPU time per
echoed datagram for each server, stock Twisted and the C echo among them.

bench/run.py draws it after every run; to draw it again from a run's JSON:

    python bench/chart.py bench/out/latest.json docs/_static/bench.svg

Needs matplotlib (the project's C{bench} extra: pip install -e '.[bench]').
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

#: What the chart calls each variant of bench/run.py.
LABELS = {
    "c-mmsg": "C echo, recvmmsg/sendmmsg (the limit)",
    "twisted": "stock Twisted listenUDP echo",
    "asyncio": "asyncio datagram endpoint echo",
    "udpdst-dst6": "udpdst, destination-aware echo, ::",
    "udpdst-dst4": "udpdst, destination-aware echo, 0.0.0.0",
    "udpdst-plain4": "udpdst, stock plain echo, 0.0.0.0",
    "udpdst-plain6": "udpdst, stock plain echo, ::",
    "udpdst-echo6": "twistd udpdst's echo (limits on), ::",
    "py-dst4": "aware echo, pure-Python path, 0.0.0.0",
    "py-plain4": "plain echo, pure-Python path, 0.0.0.0",
    "py-echo6": "service echo, pure-Python path, ::",
}

#: Bar colours: the references, then udpdst's C path and its pure-Python path.
COLOURS = {"c-mmsg": "#555555", "twisted": "#e08a2c", "asyncio": "#c9b79c"}
C_PATH = "#2b6cb0"
PYTHON_PATH = "#90b4dd"


def _colour(name: str) -> str:
    if name in COLOURS:
        return COLOURS[name]
    return PYTHON_PATH if name.startswith("py-") else C_PATH


def caption(result: dict[str, Any]) -> str:
    """
    When, on what and from which commit the run was made, in one line.
    """
    env = result["environment"]
    config = result["config"]
    when = result.get("finished") or "date unknown"
    commit = env.get("git") or "unknown commit"
    others = [
        v["other_on_server_core_median"]
        for v in result["summary"].values()
        if v.get("other_on_server_core_median") is not None
    ]
    busy = (
        f", other processes took up to {100 * max(others):.0f}% of the server's core"
        if others
        else ""
    )
    if env.get("git_dirty"):
        commit += " (with uncommitted changes to udpdst/)"
    return (
        f"{when}, commit {commit}; {env.get('cpu') or 'unknown CPU'}, "
        f"{len(env.get('cpus') or [])} cores, Linux {env.get('kernel')}, "
        f"Python {env.get('python')}, Twisted {env.get('twisted')}; "
        f"{config['rounds']} rounds x {config['duration']:g} s, "
        f"{config['sockets']} sockets x {config['window']} in flight, "
        f"{config['size']}-byte datagrams, load average at start "
        f"{env['loadavg_start'][0]:.1f}{busy}"
    )


def draw(result: dict[str, Any], path: Path) -> None:
    """
    Write the chart of C{result} (what bench/run.py writes as JSON) to
    C{path}: SVG or PNG, by its suffix.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The same run gives the same SVG, byte for byte.
    plt.rcParams["svg.hashsalt"] = "udpdst-bench"
    # Text stays text: smaller, searchable, read by screen readers.
    plt.rcParams["svg.fonttype"] = "none"
    summary = result["summary"]
    names = [n for n in result["variants"] if n in summary]
    labels = [LABELS.get(n, result["variants"][n]["description"]) for n in names]
    rates = [summary[n]["rate_median"] or 0 for n in names]
    cpus = [summary[n]["cpu_us_per_dgram_median"] or 0 for n in names]
    low = [
        c - (summary[n]["cpu_us_per_dgram_min"] or c)
        for n, c in zip(names, cpus, strict=True)
    ]
    high = [
        (summary[n]["cpu_us_per_dgram_max"] or c) - c
        for n, c in zip(names, cpus, strict=True)
    ]
    colours = [_colour(n) for n in names]
    rows = list(range(len(names)))

    figure, (left, right) = plt.subplots(
        1, 2, figsize=(12, 0.42 * len(names) + 2.2), sharey=True
    )
    left.barh(rows, [r / 1000 for r in rates], color=colours)
    left.set_xlabel("replies per second, thousands (higher is better)")
    right.barh(rows, cpus, xerr=[low, high], color=colours, ecolor="#333333")
    right.set_xlabel("server CPU µs per echoed datagram (lower is better)")
    left.set_yticks(rows, labels)
    left.invert_yaxis()
    for axis, values, beyond, key, unit in (
        (
            left,
            [r / 1000 for r in rates],
            [0.0] * len(names),
            "rate_ratio_to_twisted",
            "k",
        ),
        (right, cpus, high, "cpu_ratio_to_twisted", " µs"),
    ):
        axis.grid(axis="x", color="#dddddd")
        axis.set_axisbelow(True)
        for row, (name, value, bar) in enumerate(
            zip(names, values, beyond, strict=True)
        ):
            ratio = summary[name].get(key)
            text = f"{value:.0f}{unit}" if unit == "k" else f"{value:.1f}{unit}"
            if name == "twisted":
                text += "  (the baseline)"
            elif ratio is not None:
                text += f"  ({ratio:.2f}x stock)"
            axis.annotate(
                text,
                (value + bar, row),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        axis.set_xlim(0, max(v + b for v, b in zip(values, beyond, strict=True)) * 1.5)
    figure.suptitle(
        "udpdst's echo against stock Twisted and a C echo (loopback, "
        "connected clients; udpdst asked through 127.0.0.2)",
        fontsize=11,
    )
    figure.text(
        0.5,
        0.01,
        caption(result) + "; error bars: fastest and slowest round; x stock: "
        "median of the per-round ratios",
        ha="center",
        fontsize=7,
        wrap=True,
    )
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(figure)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(
            "usage: python bench/chart.py RUN.json CHART.svg|CHART.png", file=sys.stderr
        )
        return 2
    result = json.loads(Path(argv[0]).read_text())
    result.setdefault(
        "finished",
        time.strftime("%Y-%m-%d", time.gmtime(Path(argv[0]).stat().st_mtime)),
    )
    try:
        draw(result, Path(argv[1]))
    except ImportError:
        print(
            "chart.py: matplotlib is missing; pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 1
    print(f"chart: {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
