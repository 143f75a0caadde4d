"""
Measure transparent replies next to ordinary ones: one C{udpdst.listenUDP}
plain echo with C{transparent=True} on C{[::]:7000} behind an nftables
C{TPROXY} rule, in a network namespace, driven from another namespace by the
C client (C{bench/client.c}: connected sockets, so a reply from a wrong
source counts as lost), round by round, interleaved:

  - C{ordinary}: to the server's own address on the listener's port; the
    reply leaves through the listening socket (C{IP_PKTINFO}, batched);
  - C{transparent}: to 198.51.100.7:5353, an address nobody has, redirected
    to the listener; each reply leaves through the cached reply socket bound
    to that pair (L{udpdst.transparent});
  - C{one-shot}: to the server's own address on port 5300, redirected; each
    reply leaves through a socket opened for it and closed after it (what
    udpdst does for the host's own addresses, so as never to hold a port a
    local service may want): the cost of a reply without the cache.

Both I/O paths (C{C}: the C extension, C{py}: C{UDPDST_IO=python}) run, each
its own server.  Prints replies/s and the server's CPU time per reply (its
own rusage), medians over the rounds, and each case's ratio to ordinary.

    python bench/transparent.py [--rounds 5] [--duration 2]

Needs root, iproute2, nftables and gcc (what C{tests/run} installs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from tests.netns import Pair, nftUnavailableReason  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
assert _spec is not None and _spec.loader is not None
run = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_run", run)
_spec.loader.exec_module(run)

PORT = 7000
FOREIGN = ("198.51.100.7", 5353)
#: The server's own address, on a port nothing holds: a reply socket per reply.
OWN = (Pair.SERVER_V4, 5300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--sockets", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    reason = nftUnavailableReason()
    if reason is not None:
        print(f"bench/transparent.py: cannot run: {reason}", file=sys.stderr)
        return 1
    run.build(os.environ.get("CC", "gcc"))
    cores = sorted(os.sched_getaffinity(0))
    serverCore, clientCore = (cores[0], cores[1]) if len(cores) > 1 else (None, None)
    clientArgs = SimpleNamespace(
        sockets=args.sockets,
        window=args.window,
        size=args.size,
        drain=0.5,
        timeout_ms=200,
    )
    pair = Pair.create()
    servers: dict[str, subprocess.Popen[str]] = {}
    try:
        assert pair.server is not None and pair.client is not None
        pair.routeForeign()
        pair.server.nft(_rules(pair))
        for path, env in (("C", {}), ("py", {"UDPDST_IO": "python"})):
            port = PORT + (0 if path == "C" else 1)
            servers[path] = proc = subprocess.Popen(
                pair.server.argv(
                    sys.executable,
                    str(BENCH / "servers.py"),
                    "udpdst-plain",
                    "::",
                    str(port),
                    "--transparent",
                ),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                bufsize=1,
                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                preexec_fn=run.pinner(serverCore),
            )
            run.readLine(proc, "ready", 20.0)
        cases = []
        for path in servers:
            port = PORT + (0 if path == "C" else 1)
            cases.append((path, "ordinary", Pair.SERVER_V4, port))
            cases.append((path, "transparent", FOREIGN[0], FOREIGN[1] + (path == "py")))
            cases.append((path, "one-shot", OWN[0], OWN[1] + (path == "py")))
        records: dict[tuple[str, str], list[dict[str, float]]] = {}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            order = cases[round_ % len(cases) :] + cases[: round_ % len(cases)]
            for path, kind, host, port in order:
                proc = servers[path]
                u0, s0 = run.serverCpu(proc)
                client = _client(
                    pair, host, port, args.duration, clientArgs, clientCore
                )
                u1, s1 = run.serverCpu(proc)
                if round_ == 0:
                    continue
                got = client["received"]
                records.setdefault((path, kind), []).append(
                    {
                        "rate": client["rate"],
                        "cpu_us": ((u1 - u0) + (s1 - s0)) / got * 1e6 if got else 0.0,
                        "lost": client["lost"],
                    }
                )
        counters = {
            path: json.loads(run.ask(proc, "s", "s").split(" ", 1)[1])["counters"]
            for path, proc in servers.items()
        }
    finally:
        for proc in servers.values():
            if proc.poll() is None:
                proc.stdin.close()  # type: ignore[union-attr]
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        pair.delete()
    print(f"{'path':4} {'case':12} {'replies/s':>10} {'µs CPU/reply':>13} {'lost':>6}")
    for path in servers:
        base = _medians(records[(path, "ordinary")])
        for kind in ("ordinary", "transparent", "one-shot"):
            rows = records[(path, kind)]
            rate, cpu = _medians(rows)
            lost = sum(r["lost"] for r in rows)
            print(
                f"{path:4} {kind:12} {rate:10.0f} {cpu:13.2f} {lost:6d}"
                f"   x ordinary: replies/s {rate / base[0]:.2f}, CPU {cpu / base[1]:.2f}"
            )
        c = counters[path]
        print(
            f"{path:4} reply sockets: opened {c['replySocketsOpened']}, reused "
            f"{c['replySocketsReused']}, evicted {c['replySocketsEvicted']}, failed "
            f"{c['replySocketsFailed']}, refused {c['replySocketsRefused']}; send "
            f"errors {c['sendErrors']}, kernel drops {c['kernelDrops']}"
        )
    return 0


def _medians(rows: list[dict[str, float]]) -> tuple[float, float]:
    """
    The median replies/s and CPU µs per reply of C{rows}.
    """
    return (
        statistics.median(r["rate"] for r in rows),
        statistics.median(r["cpu_us"] for r in rows),
    )


def _rules(pair: Pair) -> str:
    """
    The TPROXY rules: L{FOREIGN} and L{OWN} to L{PORT} (the C path's
    server), the same addresses on the next ports to the next port (the
    Python path's).
    """
    rules = "".join(
        f'    iifname "{pair.SERVER_IF}" ip daddr {host} udp dport {port + i} '
        f"tproxy ip to :{PORT + i} meta mark set 1 accept\n"
        for host, port in (FOREIGN, OWN)
        for i in (0, 1)
    )
    return (
        "table inet udpdst_bench {\n"
        "  chain prerouting {\n"
        "    type filter hook prerouting priority mangle; policy accept;\n"
        f"{rules}"
        "  }\n"
        "}\n"
    )


def _client(
    pair: Pair,
    host: str,
    port: int,
    duration: float,
    args: SimpleNamespace,
    core: int | None,
) -> dict:
    assert pair.client is not None
    out = subprocess.run(
        pair.client.argv(
            str(BENCH / "client.bin"),
            "--host",
            host,
            "--port",
            str(port),
            "--sockets",
            str(args.sockets),
            "--window",
            str(args.window),
            "--size",
            str(args.size),
            "--duration",
            str(duration),
            "--drain",
            str(args.drain),
            "--timeout-ms",
            str(args.timeout_ms),
        ),
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + args.drain + 10,
        preexec_fn=run.pinner(core),
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


if __name__ == "__main__":
    sys.exit(main())
