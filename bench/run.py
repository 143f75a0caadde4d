#!/usr/bin/env python3
"""
Benchmark driver: udpdst's echo against stock Twisted, asyncio and C, interleaved.

Starts every server once (pinned to one core), then runs the C load generator
(bench/client.c, pinned to another core) against each in turn, round after
round (A B C ... A B C ..., the order rotated each round), and reports per
variant the median over rounds of the server's CPU time per echoed datagram
(read by the server from its own rusage, around the window) and of the
replies per second, each also as the median of the per-round ratios to stock
Twisted.  See bench/README.md for how to read the result.

    python bench/run.py            # full run, about 5 minutes
    python bench/run.py --quick    # smoke run, about 50 seconds

It also draws the run as a chart (bench/chart.py; bench/out/chart.svg).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"

#: The reference variant every ratio is taken against.
BASELINE = "twisted"

#: Seconds of one window-1 latency slice (see main).
LATENCY_SLICE = 0.25


@dataclass
class Variant:
    """
    One server to measure: how to start it and where the client sends.
    """

    name: str
    description: str
    command: list[str]
    target: str
    #: True when the target is not the address the kernel would pick as the
    #: reply source, so that only a destination-aware server answers correctly.
    exercisesDestination: bool = False
    #: Another udpdst tree to import instead of the checkout's (--tree).
    tree: Path | None = None
    #: Extra environment for the server (e.g. UDPDST_IO=python).
    env: dict = field(default_factory=dict)
    process: subprocess.Popen | None = field(default=None, repr=False)
    port: int | None = None
    error: str | None = None


def variants(python: str) -> dict[str, Variant]:
    """
    Every variant the benchmark knows, by name, in table order.
    """
    servers = [python, str(BENCH / "servers.py")]
    cserver = str(BENCH / "cserver.bin")
    table = [
        Variant(
            "c-mmsg",
            "C recvmmsg/sendmmsg + IP_PKTINFO, '::'",
            [cserver, "::", "0"],
            "127.0.0.2",
            True,
        ),
        Variant(
            "twisted",
            "Twisted reactor.listenUDP echo, '0.0.0.0'",
            servers + ["twisted", "0.0.0.0", "0"],
            "127.0.0.1",
        ),
        Variant(
            "asyncio",
            "asyncio datagram endpoint echo, '0.0.0.0'",
            servers + ["asyncio", "0.0.0.0", "0"],
            "127.0.0.1",
        ),
        Variant(
            "udpdst-dst6",
            "udpdst DestinationDatagramProtocol echo, '::'",
            servers + ["udpdst-dst", "::", "0"],
            "127.0.0.2",
            True,
        ),
        Variant(
            "udpdst-dst4",
            "udpdst DestinationDatagramProtocol echo, '0.0.0.0'",
            servers + ["udpdst-dst", "0.0.0.0", "0"],
            "127.0.0.2",
            True,
        ),
        Variant(
            "udpdst-plain4",
            "udpdst + plain DatagramProtocol echo, '0.0.0.0'",
            servers + ["udpdst-plain", "0.0.0.0", "0"],
            "127.0.0.2",
            True,
        ),
        Variant(
            "udpdst-plain6",
            "udpdst + plain DatagramProtocol echo, '::'",
            servers + ["udpdst-plain", "::", "0"],
            "127.0.0.2",
            True,
        ),
        Variant(
            "udpdst-echo6",
            "udpdst.echo.EchoProtocol (service), '::'",
            servers + ["udpdst-echo", "::", "0"],
            "127.0.0.2",
            True,
        ),
        # The pure-Python I/O path (what runs where udpdst._mmsg is not built).
        Variant(
            "py-dst4",
            "as udpdst-dst4, UDPDST_IO=python (recvmsg/sendmsg)",
            servers + ["udpdst-dst", "0.0.0.0", "0"],
            "127.0.0.2",
            True,
            env={"UDPDST_IO": "python"},
        ),
        Variant(
            "py-plain4",
            "as udpdst-plain4, UDPDST_IO=python (recvmsg/sendmsg)",
            servers + ["udpdst-plain", "0.0.0.0", "0"],
            "127.0.0.2",
            True,
            env={"UDPDST_IO": "python"},
        ),
        Variant(
            "py-echo6",
            "as udpdst-echo6, UDPDST_IO=python (recvmsg/sendmsg)",
            servers + ["udpdst-echo", "::", "0"],
            "127.0.0.2",
            True,
            env={"UDPDST_IO": "python"},
        ),
        # Not in the default set: IPv6 proper, through ::1.
        Variant(
            "udpdst-dst6-v6",
            "udpdst DestinationDatagramProtocol echo, '::' via ::1",
            servers + ["udpdst-dst", "::", "0"],
            "::1",
        ),
    ]
    return {v.name: v for v in table}


DEFAULT_VARIANTS = [
    "c-mmsg",
    "twisted",
    "asyncio",
    "udpdst-dst6",
    "udpdst-dst4",
    "udpdst-plain4",
    "udpdst-plain6",
    "udpdst-echo6",
    "py-dst4",
    "py-plain4",
    "py-echo6",
]


def build(gcc: str) -> None:
    """
    Compile the C client and server next to their sources (bench/*.bin is
    git-ignored), unless the binaries are newer than the sources.  Each is
    written to a temporary name and renamed, so concurrent runs do not trip
    over a half-written binary.
    """
    for name in ("client", "cserver"):
        src, binary = BENCH / f"{name}.c", BENCH / f"{name}.bin"
        if binary.exists() and binary.stat().st_mtime >= src.stat().st_mtime:
            continue
        tmp = BENCH / f".{name}.{os.getpid()}.tmp"
        subprocess.run(
            [gcc, "-O2", "-Wall", "-std=gnu11", "-o", str(tmp), str(src)],
            check=True,
        )
        os.replace(tmp, binary)


def pinner(cpu: int | None):
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def readLine(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    """
    Read stdout lines from a server until one starts with C{prefix}.
    """
    import selectors

    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"no {prefix!r} line within {timeout}s")
            line = proc.stdout.readline()
            if not line:
                raise EOFError("server exited")
            if line.startswith(prefix + " "):
                return line.rstrip("\n")


def ask(
    proc: subprocess.Popen, command: str, prefix: str, timeout: float = 10.0
) -> str:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return readLine(proc, prefix, timeout)


def serverCpu(proc: subprocess.Popen) -> tuple[float, float]:
    """
    The server's own (user, system) CPU seconds, as it reports them.
    """
    words = ask(proc, "m", "m").split()
    return float(words[1]), float(words[2])


def procStatCpu(pid: int) -> float:
    """
    The server's CPU seconds from /proc/PID/stat (10 ms resolution): a cross
    check of the rusage the server reports, recorded in the JSON only.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def coreTimes() -> dict[int, dict[str, float]]:
    """
    Per-core idle and steal seconds from /proc/stat, to tell afterwards
    whether a window was disturbed (steal: the hypervisor ran someone else).
    """
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                out[int(name[3:])] = {
                    "idle": int(fields[3]) / ticks,
                    "steal": int(fields[7]) / ticks,
                }
    return out


def ksoftirqd(core: int | None) -> int | None:
    """
    The PID of the kernel thread that runs deferred softirq work on C{core}.
    On loopback the delivery of each reply normally runs inline, in the
    sender's system time; if the kernel deferred it to ksoftirqd instead, the
    server's rusage would miss it, so the JSON records that thread's time.
    """
    if core is None:
        return None
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == f"ksoftirqd/{core}":
                        return int(entry)
            except OSError:
                continue
    return None


def startServers(chosen: list[Variant], cpu: int | None, env: dict) -> None:
    for v in chosen:
        v.process = subprocess.Popen(
            v.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={
                **env,
                **({"PYTHONPATH": str(v.tree)} if v.tree is not None else {}),
                **v.env,
            },
            preexec_fn=pinner(cpu),
        )
    for v in chosen:
        try:
            v.port = int(readLine(v.process, "ready", 20.0).split()[1])
        except (TimeoutError, EOFError) as e:
            stopServer(v)
            err = (v.process.stderr.read() or "").strip().splitlines()
            v.error = f"{e}: {err[-1] if err else 'no error output'}"


def stopServer(v: Variant) -> None:
    proc = v.process
    if proc is None or proc.returncode is not None:
        return
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its handle
        proc.wait()


def runClient(
    v: Variant,
    args,
    duration: float,
    cpu: int | None,
    timeoutMs: float | None = None,
    sockets: int | None = None,
    window: int | None = None,
    drain: float | None = None,
) -> dict:
    cmd = [
        str(BENCH / "client.bin"),
        "--host",
        v.target,
        "--port",
        str(v.port),
        "--sockets",
        str(sockets or args.sockets),
        "--window",
        str(window or args.window),
        "--size",
        str(args.size),
        "--duration",
        str(duration),
        "--drain",
        str(args.drain if drain is None else drain),
        "--timeout-ms",
        str(timeoutMs if timeoutMs is not None else args.timeout_ms),
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + args.drain + 10,
        preexec_fn=pinner(cpu),
    )
    return json.loads(out.stdout)


def measure(
    v: Variant,
    args,
    duration: float,
    serverCore,
    clientCore,
    softirqPid: int | None = None,
) -> dict:
    """
    One measured window: server rusage, client run, server rusage.
    """
    cores0 = coreTimes()
    soft0 = procStatCpu(softirqPid) if softirqPid else None
    stat0 = procStatCpu(v.process.pid)
    u0, s0 = serverCpu(v.process)
    w0 = time.monotonic()
    client = runClient(v, args, duration, clientCore)
    w1 = time.monotonic()
    u1, s1 = serverCpu(v.process)
    stat1 = procStatCpu(v.process.pid)
    soft1 = procStatCpu(softirqPid) if softirqPid else None
    cores1 = coreTimes()
    cpu = (u1 - u0) + (s1 - s0)
    received = client["received"]
    return {
        "variant": v.name,
        "target": v.target,
        **client,
        "server_user_s": u1 - u0,
        "server_sys_s": s1 - s0,
        "server_cpu_s": cpu,
        "server_cpu_s_procstat": stat1 - stat0,
        "ksoftirqd_server_core_s": soft1 - soft0 if soft0 is not None else None,
        "window_s": w1 - w0,
        "steal_s": {
            c: cores1[c]["steal"] - cores0[c]["steal"] for c in cores1 if c in cores0
        },
        # What else ran on the server's core during the window: its busy
        # time less this server's CPU (10 ms resolution; None when unpinned).
        "other_on_server_core": (
            max(
                0.0,
                (w1 - w0)
                - (cores1[serverCore]["idle"] - cores0[serverCore]["idle"])
                - cpu,
            )
            / (w1 - w0)
            if serverCore in cores0 and serverCore in cores1
            else None
        ),
        "server_cpu_util": cpu / client["elapsed"] if client["elapsed"] else None,
        "client_cpu_util": client["cpu_s"] / client["elapsed"]
        if client["elapsed"]
        else None,
        "cpu_us_per_dgram": cpu / received * 1e6 if received else None,
    }


def serverRss(v: Variant) -> int | None:
    try:
        return json.loads(ask(v.process, "s", "s", 10.0)[2:]).get("rss_kb")
    except (TimeoutError, EOFError, ValueError):
        return None


def memoryPhase(chosen: list[Variant], peers: int, passes: int = 3) -> dict:
    """
    Send one datagram from each of C{peers} distinct sources (a fresh socket
    bound to a random 127/8 address), C{passes} times with new sources each
    time, and read each server's RSS before and after each pass: once every
    cache is full (9,216 peers fill the port's), RSS stays flat, so the last
    pass adds about nothing.  (The replies go to closed sockets; the ICMP
    errors they cause are part of the load.)
    """
    import random
    import socket

    rng = random.Random(1)
    out = {}
    for v in chosen:
        rss = [serverRss(v)]
        for _ in range(passes):
            for n in range(peers):
                host = f"127.{rng.randrange(1, 255)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((host, 0))
                    s.sendto(b"m" * 32, (v.target, v.port))
                if n % 256 == 255:
                    time.sleep(0.002)  # let the server keep up
            time.sleep(0.2)
            rss.append(serverRss(v))
        out[v.name] = {
            "peers_per_pass": peers,
            "rss_kb": rss,
            # Once every cache is full (a pass or two), RSS must not grow.
            "growth_last_pass_kb": (
                rss[-1] - rss[-2] if None not in (rss[-2], rss[-1]) else None
            ),
        }
    return out


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(records: list[dict], names: list[str]) -> dict[str, dict]:
    byRound: dict[int, dict[str, dict]] = {}
    for r in records:
        byRound.setdefault(r["round"], {})[r["variant"]] = r
    summary = {}
    for name in names:
        rs = [r for r in records if r["variant"] == name]
        if not rs:
            continue
        cpuRatios, rateRatios = [], []
        for rnd in byRound.values():
            a, b = rnd.get(name), rnd.get(BASELINE)
            if a and b and a["cpu_us_per_dgram"] and b["cpu_us_per_dgram"]:
                cpuRatios.append(a["cpu_us_per_dgram"] / b["cpu_us_per_dgram"])
            if a and b and b["rate"]:
                rateRatios.append(a["rate"] / b["rate"])
        cpus = [r["cpu_us_per_dgram"] for r in rs if r["cpu_us_per_dgram"]]
        summary[name] = {
            "target": rs[0]["target"],
            "rounds": len(rs),
            "cpu_us_per_dgram_median": median(cpus),
            "cpu_us_per_dgram_min": min(cpus) if cpus else None,
            "cpu_us_per_dgram_max": max(cpus) if cpus else None,
            "cpu_ratio_to_twisted": median(cpuRatios),
            "rate_median": median([r["rate"] for r in rs]),
            "rate_ratio_to_twisted": median(rateRatios),
            "server_cpu_util_median": median([r["server_cpu_util"] for r in rs]),
            "client_cpu_util_median": median([r["client_cpu_util"] for r in rs]),
            "other_on_server_core_median": median(
                [r["other_on_server_core"] for r in rs]
            ),
            "server_user_share": median(
                [
                    r["server_user_s"] / r["server_cpu_s"]
                    for r in rs
                    if r["server_cpu_s"]
                ]
            ),
            "sent": sum(r["sent"] for r in rs),
            "received": sum(r["received"] for r in rs),
            "lost": sum(r["lost"] for r in rs),
            "late": sum(r["late"] for r in rs),
            "bad": sum(r["bad"] for r in rs),
            "client_rcvbuf_drops": sum(r["rcvbuf_drops"] for r in rs),
        }
    return summary


def pct(x):
    return None if x is None else 100 * x


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(
    summary: dict[str, dict], chosen: list[Variant], failed: list[Variant]
) -> str:
    width = max([15] + [len(v.name) for v in chosen + failed])
    head = (
        f"{'variant':<{width}} {'target':<10} {'µs/dgram':>9} {'min-max':>13} "
        f"{'×twisted':>8} {'replies/s':>10} {'×twisted':>8} {'srv%':>5} {'cli%':>5} {'oth%':>5} "
        f"{'sent':>10} {'lost':>6}"
    )
    lines = [head, "-" * len(head)]
    for v in chosen:
        s = summary.get(v.name)
        if s is None:
            continue
        lines.append(
            f"{v.name:<{width}} {s['target']:<10} "
            f"{fmt(s['cpu_us_per_dgram_median'], '9.2f')} "
            f"{fmt(s['cpu_us_per_dgram_min'], '6.2f')}-{fmt(s['cpu_us_per_dgram_max'], '<6.2f')} "
            f"{fmt(s['cpu_ratio_to_twisted'], '8.2f')} "
            f"{fmt(s['rate_median'], '10.0f')} "
            f"{fmt(s['rate_ratio_to_twisted'], '8.2f')} "
            f"{fmt(s['server_cpu_util_median'] and 100 * s['server_cpu_util_median'], '5.0f')} "
            f"{fmt(s['client_cpu_util_median'] and 100 * s['client_cpu_util_median'], '5.0f')} "
            f"{fmt(pct(s['other_on_server_core_median']), '5.0f')} "
            f"{s['sent']:>10} {s['lost']:>6}"
        )
    for v in failed:
        lines.append(f"{v.name:<{width}} not measured: {v.error}")
    return "\n".join(lines)


def environment() -> dict:
    def run(*cmd):
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, cwd=ROOT
            ).stdout.strip()
        except OSError:
            return None

    try:
        import twisted

        tw = twisted.__version__
    except ImportError:
        tw = None
    model = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "twisted": tw,
        "kernel": platform.release(),
        "cpu": model,
        "cpus": sorted(os.sched_getaffinity(0)),
        "loadavg_start": os.getloadavg(),
        "git": run("git", "rev-parse", "--short", "HEAD"),
        "git_dirty": bool(run("git", "status", "--porcelain", "--", "udpdst")),
    }


def parseArgs(argv):
    p = argparse.ArgumentParser(
        description="udpdst echo benchmark (see bench/README.md)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 rounds of 0.5 s windows (well under 30 s)",
    )
    p.add_argument("--rounds", type=int, help="rounds (default 5, quick 2)")
    p.add_argument(
        "--duration",
        type=float,
        help="seconds per measured window (default 3, quick 0.5)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        help="seconds of unmeasured load per server first (default 0.5, quick 0.2)",
    )
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated; also known: udpdst-dst6-v6 (via ::1)",
    )
    p.add_argument("--sockets", type=int, default=4, help="connected client sockets")
    p.add_argument(
        "--window", type=int, default=32, help="requests outstanding per socket"
    )
    p.add_argument("--size", type=int, default=64, help="datagram payload bytes")
    p.add_argument(
        "--drain",
        type=float,
        default=0.3,
        help="seconds the client waits for in-flight replies",
    )
    p.add_argument(
        "--timeout-ms",
        type=float,
        default=200,
        help="a socket with no reply this long declares its window lost",
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin server and client to different cores",
    )
    p.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also run every chosen udpdst variant against the udpdst package in "
        "PATH (a directory holding udpdst/), as VARIANT@LABEL, interleaved with "
        "the checkout's: an A/B of a patch",
    )
    p.add_argument(
        "--latency",
        type=float,
        help="seconds of window-1 latency (one request in flight) per variant "
        "and round, taken in slices of 0.25 s interleaved with the other "
        "variants' (default 1, quick 0.3; 0 skips)",
    )
    p.add_argument(
        "--peers",
        type=int,
        help="distinct sources per pass of the memory check (default 20000, "
        "quick 2000; 0 skips)",
    )
    p.add_argument("--python", default=sys.executable, help="interpreter for servers")
    p.add_argument(
        "--out", type=Path, default=OUT, help="directory for the JSON and the chart"
    )
    p.add_argument(
        "--chart",
        type=Path,
        help="where to draw the chart, .svg or .png (default OUT/chart.svg; "
        "needs matplotlib: pip install -e '.[bench]')",
    )
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.duration is None:
        args.duration = 0.5 if args.quick else 3.0
    if args.warmup is None:
        args.warmup = 0.2 if args.quick else 0.5
    if args.latency is None:
        args.latency = 0.3 if args.quick else 1.0
    if args.peers is None:
        args.peers = 2000 if args.quick else 20000
    return args


def main(argv=None) -> int:
    args = parseArgs(argv)
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        print(
            "run.py: no C compiler found; install gcc (apt-get install gcc).",
            file=sys.stderr,
        )
        return 2
    build(gcc)

    known = variants(args.python)
    unknown = [n for n in args.variants.split(",") if n not in known]
    if unknown:
        print(
            f"run.py: unknown variant(s) {', '.join(unknown)}; known: "
            f"{', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    names = args.variants.split(",")
    if BASELINE not in names:
        names.insert(0, BASELINE)

    cpus = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(cpus) < 2:
        serverCore = clientCore = None
    else:
        serverCore, clientCore = cpus[0], cpus[1]

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.pop("PYTHONHASHSEED", None)

    allVariants = [known[n] for n in names]
    for spec in args.tree:
        label, sep, path = spec.partition("=")
        tree = Path(path).resolve()
        if not sep or not (tree / "udpdst" / "__init__.py").is_file():
            print(
                f"run.py: --tree {spec!r}: expected LABEL=PATH with PATH/udpdst/ in it",
                file=sys.stderr,
            )
            return 2
        for n in names:
            if n.startswith("udpdst-"):
                v = known[n]
                allVariants.append(
                    Variant(
                        f"{n}@{label}",
                        f"{v.description}, udpdst from {tree}",
                        v.command,
                        v.target,
                        v.exercisesDestination,
                        tree=tree,
                        env=v.env,
                    )
                )
    env0 = environment()
    softirqPid = ksoftirqd(serverCore)
    started = time.monotonic()
    records: list[dict] = []
    control = None
    latency: dict[str, list] = {}
    memory: dict = {}
    try:
        startServers(allVariants, serverCore, env)
        chosen = [v for v in allVariants if v.error is None]
        failed = [v for v in allVariants if v.error is not None]
        for v in failed:
            print(f"run.py: {v.name} not measured: {v.error}", file=sys.stderr)

        for v in chosen:
            runClient(v, args, args.warmup, clientCore)

        # Show that the client really drops replies from the wrong source:
        # stock Twisted on 0.0.0.0, asked through 127.0.0.2, answers from
        # 127.0.0.1.  Short, and with a short timeout; never measured.
        base = known[BASELINE]
        if base in chosen:
            probe = Variant(
                base.name, base.description, base.command, "127.0.0.2", port=base.port
            )
            control = runClient(probe, args, 0.3, clientCore, timeoutMs=50)

        for rnd in range(args.rounds):
            shift = rnd % len(chosen)
            for v in chosen[shift:] + chosen[:shift]:
                rec = measure(
                    v, args, args.duration, serverCore, clientCore, softirqPid
                )
                rec["round"] = rnd
                records.append(rec)

        # Window 1: one request in flight, so the round trip is latency.  A
        # VM's wake-up latency drifts between slow and fast phases lasting
        # seconds (seen here: 150 or 430 µs for every server alike), so each
        # variant's window is cut into short slices taken in turn with the
        # others' (A B C A B C ...); a cycle is one slice of each.
        latency: dict[str, list] = {}
        if args.latency > 0:
            slices = max(1, round(args.latency / LATENCY_SLICE))
            for rnd in range(args.rounds):
                shift = rnd % len(chosen)
                for _ in range(slices):
                    for v in chosen[shift:] + chosen[:shift]:
                        r = runClient(
                            v,
                            args,
                            args.latency / slices,
                            clientCore,
                            sockets=1,
                            window=1,
                            drain=0.05,
                        )
                        latency.setdefault(v.name, []).append(r.get("rtt_p50_us"))

        memory = {}
        if args.peers > 0:
            memory = memoryPhase(
                [v for v in chosen if v.name != "c-mmsg" and v.name != "asyncio"],
                args.peers,
            )

        stats = {}
        for v in chosen:
            try:
                stats[v.name] = json.loads(ask(v.process, "s", "s", 5.0)[2:])
            except (TimeoutError, EOFError, ValueError):
                pass
    finally:
        for v in allVariants:
            stopServer(v)

    summary = summarise(records, [v.name for v in chosen])
    baseline = latency.get(BASELINE, [])
    for name, values in latency.items():
        if name in summary:
            summary[name]["rtt_p50_us_window1"] = median(
                [x for x in values if x is not None and x >= 0]
            )
            # Ratios within each cycle, as for throughput within each round.
            ratios = [
                x / b
                for x, b in zip(values, baseline, strict=False)
                if x is not None and x >= 0 and b
            ]
            summary[name]["rtt_p50_window1_x_baseline"] = median(ratios)
    for name, m in memory.items():
        if name in summary:
            summary[name]["memory"] = m
    elapsed = time.monotonic() - started
    print(
        f"udpdst echo benchmark: {args.rounds} rounds x {args.duration:g} s, "
        f"{args.sockets} sockets x {args.window} in flight, {args.size}-byte datagrams, "
        f"server on cpu {serverCore}, client on cpu {clientCore}"
    )
    print(table(summary, chosen, failed))
    print(
        "µs/dgram: server CPU (user+sys, own rusage) per echoed datagram, median of "
        "rounds; ×twisted: median of per-round ratios to stock Twisted (lower is "
        "better for µs, higher for replies/s); srv%/cli%: CPU use of server/client "
        "in the window; oth%: CPU taken on the server's core by other processes."
    )
    if control is not None:
        print(
            f"client check: stock Twisted on 0.0.0.0 via 127.0.0.2 (replies from "
            f"127.0.0.1): sent {control['sent']}, received {control['received']} "
            f"-> wrong-source replies are counted as lost"
        )
    busy = [
        x["other_on_server_core_median"]
        for x in summary.values()
        if x.get("other_on_server_core_median") is not None
    ]
    if busy and max(busy) > 0.1:
        print(
            f"note: other processes took up to {100 * max(busy):.0f}% of the server's "
            "core (load average at start "
            f"{env0['loadavg_start'][0]:.1f}): replies/s is unreliable; µs/dgram and "
            "the ratios still compare."
        )
    if latency:
        print(
            "window-1 p50 round trip (one request in flight; µs: median of the "
            f"{len(latency.get(BASELINE, []))} interleaved slices' p50s; "
            "×twisted: median of the ratios within each cycle of slices):"
        )
        for v in chosen:
            p50 = summary.get(v.name, {}).get("rtt_p50_us_window1")
            ratio = summary.get(v.name, {}).get("rtt_p50_window1_x_baseline")
            shown = f"  ×twisted {ratio:.2f}" if ratio else ""
            print(f"  {v.name:<15} {fmt(p50, '6.0f')}{shown}")
    if memory:
        print(
            f"memory with many peers (server RSS in MB: start, then after each pass "
            f"of {args.peers} new distinct sources; bounded caches keep it flat):"
        )
        for name, m in memory.items():
            rss = " ".join(fmt(x and x / 1024, ".1f") for x in m["rss_kb"])
            growth = m["growth_last_pass_kb"]
            print(
                f"  {name:<15} {rss}   last pass: "
                f"{fmt(growth and growth / 1024, '+.1f')} MB"
            )
    print(f"total {elapsed:.1f} s")

    result = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        },
        "environment": {**env0, "loadavg_end": os.getloadavg()},
        "server_core": serverCore,
        "client_core": clientCore,
        "variants": {
            v.name: {
                "description": v.description,
                "target": v.target,
                "exercises_destination": v.exercisesDestination,
                "command": v.command[1:] if v.command[0] == args.python else v.command,
                "error": v.error,
            }
            for v in allVariants
        },
        "summary": summary,
        "server_stats": stats,
        "wrong_source_check": control,
        "latency_rtt_p50_us": latency,
        "memory": memory,
        "records": records,
        "elapsed_s": elapsed,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"bench-{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    (args.out / "latest.json").write_text(json.dumps(result, indent=1))
    print(f"JSON: {path}")
    drawChart(result, args.chart or args.out / "chart.svg")
    return 0


def drawChart(result: dict, path: Path) -> None:
    """
    Draw the run's chart (bench/chart.py), or say in one line why not.
    """
    sys.path.insert(0, str(BENCH))
    try:
        import chart
    finally:
        sys.path.remove(str(BENCH))
    try:
        chart.draw(result, path)
    except ImportError:
        print("chart: not drawn: matplotlib is missing; pip install -e '.[bench]'")
        return
    print(f"chart: {path}")


if __name__ == "__main__":
    sys.exit(main())
