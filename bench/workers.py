"""
Measure C{twistd udpdst} with several processes on loopback: one process,
N workers sharing one socket (C{workers = N}, what udpdst does), and N
independent processes with one C{SO_REUSEPORT} socket each (the
alternative), interleaved round by round (A B C A B C ...).

    python bench/workers.py [--workers 2] [--rounds 3] [--duration 3]

It runs the service as an operator would (the twistd of this Python, rate
limit off so that the load is not refused), drives it with the C client
(C{bench/client.c}: connected sockets, so replies from a wrong source count
as lost), and prints replies/s and the server's CPU time per reply, summed
over all its processes, from /proc.  Nothing is pinned: the workers need
every core, and the client shares them; on a machine with as many cores as
workers the client takes CPU from the server, so read the ratios with that
in mind.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TWISTD = str(Path(sys.executable).parent / "twistd")
TICKS = os.sysconf("SC_CLK_TCK")


def buildClient() -> Path:
    binary = BENCH / "client.bin"
    source = BENCH / "client.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise SystemExit("bench/workers.py: no C compiler to build bench/client.c")
        tmp = BENCH / f".client.{os.getpid()}.tmp"
        subprocess.run(
            [gcc, "-O2", "-Wall", "-std=gnu11", "-o", str(tmp), str(source)], check=True
        )
        os.replace(tmp, binary)
    return binary


def treeCpu(pid: int) -> float:
    """
    CPU seconds (user + system) of a process and its descendants now.
    """
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICKS
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, ValueError, IndexError):
        return total
    return total + sum(treeCpu(child) for child in children)


class Server:
    """
    A twistd udpdst process (with its workers, if any).
    """

    def __init__(self, config: Path, port: int, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "udpdst", "--config", str(config), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.port = port

    def waitFor(self, pattern: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while not any(re.search(pattern, line) for line in self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(
                    f"bench/workers.py: server did not log {pattern!r}:\n"
                    + "".join(self.lines)
                )
            line = self.proc.stdout.readline()
            if line:
                self.lines.append(line)

    def cpu(self) -> float:
        return treeCpu(self.proc.pid)

    def stop(self) -> list[str]:
        """
        Stop it (SIGTERM); its final stats lines.
        """
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rest, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        self.lines += rest.splitlines(keepends=True)
        return [line.split("] ", 1)[-1] for line in self.lines if "final stats" in line]


def runClient(client: Path, port: int, args: argparse.Namespace) -> dict:
    out = subprocess.run(
        [
            str(client),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--sockets",
            str(args.sockets),
            "--window",
            str(args.window),
            "--size",
            "64",
            "--duration",
            str(args.duration),
            "--drain",
            "1",
            "--timeout-ms",
            "200",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=args.duration + 30,
    )
    return json.loads(out.stdout)


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--sockets", type=int, default=16)
    p.add_argument("--window", type=int, default=8)
    args = p.parse_args(argv)
    client = buildClient()
    n = args.workers
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "udpdst.toml"
        config.write_text(
            '[limits]\nper_source_rate = 0\nper_prefix_rate = 0\n[log]\nlevel = "info"\nstats_interval = 0\n'
        )
        variants: dict[str, list[Server]] = {}
        port = freePort()
        variants["1 process"] = [Server(config, port, "--listen", f"127.0.0.1:{port}")]
        port = freePort()
        variants[f"{n} workers, one shared socket"] = [
            Server(config, port, "--listen", f"127.0.0.1:{port}", "--workers", str(n))
        ]
        port = freePort()
        variants[f"{n} processes, SO_REUSEPORT"] = [
            Server(config, port, "--listen", f"127.0.0.1:{port}", "--reuse-port")
            for _ in range(n)
        ]
        try:
            for name, servers in variants.items():
                for server in servers:
                    server.waitFor(
                        "udpdst workers: .* running" if "workers" in name else "running"
                    )
            results: dict[str, list[dict]] = {name: [] for name in variants}
            for servers in variants.values():  # warm-up
                runClient(
                    client,
                    servers[0].port,
                    argparse.Namespace(**{**vars(args), "duration": 1.0}),
                )
            for _ in range(args.rounds):
                for name, servers in variants.items():
                    before = sum(s.cpu() for s in servers)
                    result = runClient(client, servers[0].port, args)
                    result["server_cpu_s"] = sum(s.cpu() for s in servers) - before
                    results[name].append(result)
        finally:
            finals = {
                name: [line for server in servers for line in server.stop()]
                for name, servers in variants.items()
            }
    base = None
    print(
        f"{os.cpu_count()} CPUs, client unpinned and sharing them; "
        f"{args.rounds} rounds x {args.duration:g} s, {args.sockets} sockets x "
        f"{args.window} in flight, 64-byte datagrams, medians:"
    )
    print(
        f"{'variant':36} {'replies/s':>10} {'x 1 proc':>8} {'CPU us/reply':>12} "
        f"{'client CPU':>10} {'lost':>6} {'of which client rcvbuf drops':>28}"
    )
    for name, rs in results.items():
        rate = median([r["rate"] for r in rs])
        cpu = median([1e6 * r["server_cpu_s"] / max(1, r["received"]) for r in rs])
        clientCpu = median([r["cpu_s"] / r["elapsed"] for r in rs if r["elapsed"]])
        base = base or rate
        lost = sum(r["lost"] for r in rs)
        drops = sum(r["rcvbuf_drops"] for r in rs)
        print(
            f"{name:36} {rate:10.0f} {rate / base:8.2f} {cpu:12.2f} "
            f"{100 * clientCpu:9.0f}% {lost:6d} {drops:28d}"
        )
    print("\nThe servers' own final stats (the SO_REUSEPORT ones, one per process):")
    for name, lines in finals.items():
        print(f"{name}:")
        for line in lines:
            print(f"    {line.rstrip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
