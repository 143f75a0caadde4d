"""
Network namespaces for the tests: build a server and a client namespace joined
by a veth pair, run the server and client scripts inside them, and always
delete what was created (and nothing else).

Needs root and iproute2; L{unavailableReason} says why not when they are
missing, so tests can skip with that reason.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SERVER_SCRIPT = HERE / "_netns_server.py"
CLIENT_SCRIPT = HERE / "_netns_client.py"

#: Bound on any single ip(8) command.
IP_TIMEOUT = 10.0

_serial = itertools.count()


class NetnsError(Exception):
    """
    An ip(8) command or a helper process failed.
    """


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT
    )
    if check and proc.returncode != 0:
        raise NetnsError(
            f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}"
        )
    return proc


def uniqueName() -> str:
    """
    A namespace name no other run uses: udpdst-<pid>-<n>.
    """
    return f"udpdst-{os.getpid()}-{next(_serial)}"


_probed: list[str | None] = []


def unavailableReason() -> str | None:
    """
    Why namespace tests cannot run here, or L{None} if they can.

    Checked once per process: root, ip(8), and that a namespace can really be
    created and entered (an unprivileged container fails there).
    """
    if _probed:
        return _probed[0]
    reason: str | None = None
    if not sys.platform.startswith("linux"):
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = "network namespace tests need root (ip netns add)"
    elif shutil.which("ip") is None:
        reason = "iproute2 (the ip command) is not installed"
    else:
        name = uniqueName()
        try:
            added = _ip("netns", "add", name, check=False)
            if added.returncode != 0:
                reason = f"ip netns add failed: {added.stderr.strip()}"
            else:
                entered = subprocess.run(
                    ["ip", "netns", "exec", name, "ip", "link", "show", "lo"],
                    capture_output=True,
                    text=True,
                    timeout=IP_TIMEOUT,
                )
                if entered.returncode != 0:
                    reason = f"ip netns exec failed: {entered.stderr.strip()}"
                else:
                    veth = _ip(
                        "-n",
                        name,
                        "link",
                        "add",
                        "probe0",
                        "type",
                        "veth",
                        "peer",
                        "name",
                        "probe1",
                        check=False,
                    )
                    if veth.returncode != 0:
                        reason = f"cannot create a veth pair: {veth.stderr.strip()}"
        except (OSError, subprocess.SubprocessError) as e:
            reason = f"ip netns unusable: {e}"
        finally:
            _ip("netns", "del", name, check=False)
    _probed.append(reason)
    return reason


def nftUnavailableReason() -> str | None:
    """
    Why tests with nftables rules cannot run here (see L{unavailableReason}),
    or L{None} if they can.
    """
    reason = unavailableReason()
    if reason is None and shutil.which("nft") is None:
        reason = "nftables (the nft command) is not installed; tests/run installs it"
    return reason


def builtPair() -> Iterator[Pair]:
    """
    For fixtures: a new L{Pair}, deleted when the test is done; the test
    skips, saying why, where namespaces cannot be built.
    """
    reason = unavailableReason()
    if reason is not None:
        pytest.skip(reason)
    built = Pair.create()
    try:
        yield built
    finally:
        built.delete()


class Namespace:
    """
    A network namespace this process created; L{delete} removes it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._alive = False

    @classmethod
    def create(cls) -> Namespace:
        ns = cls(uniqueName())
        _ip("netns", "add", ns.name)
        ns._alive = True
        return ns

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """
        Run C{ip -n NAME ARGS}.
        """
        return _ip("-n", self.name, *args, check=check)

    def argv(self, *command: str) -> list[str]:
        """
        The argv that runs C{command} inside this namespace.
        """
        return ["ip", "netns", "exec", self.name, *command]

    def sysctl(self, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        proc = subprocess.run(
            self.argv("sh", "-c", f"echo {value} > {path}"),
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT,
        )
        if proc.returncode != 0:
            raise NetnsError(
                f"sysctl {key}={value} in {self.name}: {proc.stderr.strip()}"
            )

    def nft(self, ruleset: str) -> None:
        """
        Load an nftables C{ruleset} (C{nft -f -}) in this namespace; the
        rules go with it.
        """
        proc = subprocess.run(
            self.argv("nft", "-f", "-"),
            input=ruleset,
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT,
        )
        if proc.returncode != 0:
            raise NetnsError(f"nft in {self.name}: {proc.stderr.strip()}")

    def run(self, *command: str, timeout: float = 30.0) -> str:
        """
        Run C{command} in this namespace; return its standard output.
        """
        proc = subprocess.run(
            self.argv(*command), capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise NetnsError(
                f"{command[0]} in {self.name} failed ({proc.returncode}): "
                f"{proc.stderr.strip()}"
            )
        return proc.stdout

    def delete(self) -> None:
        if self._alive:
            self._alive = False
            _ip("netns", "del", self.name, check=False)


class Pair:
    """
    A server namespace and a client namespace on one veth link::

        server veth0: 10.1.2.2/24 (primary), 10.1.2.3/24 (secondary),
                      fd00:1:2::2/64, fd00:1:2::3/64, fe80::2/64
                 lo:  192.0.2.10/32, fd00:99::10/128 (VIPs, as in DSR)
             decoy0:  fe80::99/64, preferred route fe80::/64 (a veth to
                      decoy1, both in the server namespace)
        client veth1: 10.1.2.5/24, fd00:1:2::5/64, fe80::5/64,
                      routes to the VIPs via the server

    The decoy link makes link-local routing ambiguous, as on any host with
    two interfaces: a reply to C{fe80::5} without its scope leaves through
    decoy0 and never reaches the client.

    IPv6 addresses are added C{nodad} and automatic link-local addresses are
    off, so no address is ever tentative.
    """

    DECOY_IF = "decoy0"
    DECOY_PEER_IF = "decoy1"
    DECOY_LL = "fe80::99"

    SERVER_IF = "veth0"
    CLIENT_IF = "veth1"
    SERVER_V4 = "10.1.2.2"
    SERVER_V4_SECONDARY = "10.1.2.3"
    SERVER_V4_LATE = "10.1.2.4"
    CLIENT_V4 = "10.1.2.5"
    BROADCAST_V4 = "10.1.2.255"
    SERVER_V6 = "fd00:1:2::2"
    SERVER_V6_SECONDARY = "fd00:1:2::3"
    SERVER_V6_LATE = "fd00:1:2::4"
    CLIENT_V6 = "fd00:1:2::5"
    SERVER_LL = "fe80::2"
    CLIENT_LL = "fe80::5"
    VIP_V4 = "192.0.2.10"
    VIP_V6 = "fd00:99::10"

    def __init__(self) -> None:
        self.server: Namespace | None = None
        self.client: Namespace | None = None
        self._processes: list[ServerProcess] = []
        self.serverIfindex = 0
        self.clientIfindex = 0

    @classmethod
    def create(cls) -> Pair:
        pair = cls()
        try:
            pair._build()
        except BaseException:
            pair.delete()
            raise
        return pair

    def _build(self) -> None:
        self.server = server = Namespace.create()
        self.client = client = Namespace.create()
        server.ip(
            "link",
            "add",
            self.SERVER_IF,
            "type",
            "veth",
            "peer",
            "name",
            self.CLIENT_IF,
            "netns",
            client.name,
        )
        for ns, ifname, v4, v6, ll in (
            (
                server,
                self.SERVER_IF,
                [self.SERVER_V4, self.SERVER_V4_SECONDARY],
                [self.SERVER_V6, self.SERVER_V6_SECONDARY],
                self.SERVER_LL,
            ),
            (
                client,
                self.CLIENT_IF,
                [self.CLIENT_V4],
                [self.CLIENT_V6],
                self.CLIENT_LL,
            ),
        ):
            ns.ip("link", "set", "lo", "up")
            ns.ip("link", "set", ifname, "addrgenmode", "none")
            for address in v4:
                ns.ip("addr", "add", f"{address}/24", "brd", "+", "dev", ifname)
            for address in [*v6, ll]:
                ns.ip("addr", "add", f"{address}/64", "dev", ifname, "nodad")
            ns.ip("link", "set", ifname, "up")
        server.ip(
            "link",
            "add",
            self.DECOY_IF,
            "type",
            "veth",
            "peer",
            "name",
            self.DECOY_PEER_IF,
        )
        for ifname in (self.DECOY_IF, self.DECOY_PEER_IF):
            server.ip("link", "set", ifname, "addrgenmode", "none")
            server.ip("link", "set", ifname, "up")
        server.ip("addr", "add", f"{self.DECOY_LL}/64", "dev", self.DECOY_IF, "nodad")
        server.ip(
            "-6", "route", "add", "fe80::/64", "dev", self.DECOY_IF, "metric", "1"
        )
        server.ip("addr", "add", f"{self.VIP_V4}/32", "dev", "lo")
        server.ip("addr", "add", f"{self.VIP_V6}/128", "dev", "lo", "nodad")
        client.ip("route", "add", f"{self.VIP_V4}/32", "via", self.SERVER_V4)
        client.ip("-6", "route", "add", f"{self.VIP_V6}/128", "via", self.SERVER_V6)
        self.waitUntilReady()
        self.serverIfindex = self.ifindex(server, self.SERVER_IF)
        self.clientIfindex = self.ifindex(client, self.CLIENT_IF)

    def waitUntilReady(self, timeout: float = 5.0) -> None:
        """
        Wait (bounded) for both veth ends to be up with no tentative address.
        """
        assert self.server is not None and self.client is not None
        deadline = time.monotonic() + timeout
        while True:
            pending = []
            for ns, ifname in (
                (self.server, self.SERVER_IF),
                (self.client, self.CLIENT_IF),
            ):
                link = ns.ip("-j", "link", "show", ifname).stdout
                if json.loads(link)[0].get("operstate") not in ("UP", "UNKNOWN"):
                    pending.append(f"{ns.name}/{ifname} down")
                if ns.ip(
                    "-6", "addr", "show", "dev", ifname, "tentative"
                ).stdout.strip():
                    pending.append(f"{ns.name}/{ifname} tentative")
            if not pending:
                return
            if time.monotonic() > deadline:
                raise NetnsError("link not ready: " + ", ".join(pending))
            time.sleep(0.05)

    def startServer(self, *args: str, timeout: float = 10.0) -> ServerProcess:
        """
        Start L{SERVER_SCRIPT} in the server namespace with C{args} and wait
        (bounded) until it listens.
        """
        assert self.server is not None
        proc = ServerProcess(
            self.server.argv(sys.executable, str(SERVER_SCRIPT), *args)
        )
        self._processes.append(proc)
        proc.waitReady(timeout)
        return proc

    def query(
        self, *queries: dict[str, Any], timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """
        Run L{CLIENT_SCRIPT} in the client namespace with C{queries}; return
        its per-query results.
        """
        assert self.client is not None
        if timeout is None:
            timeout = 5.0 + sum(q.get("timeout", 2.0) for q in queries)
        proc = subprocess.run(
            self.client.argv(
                sys.executable, str(CLIENT_SCRIPT), json.dumps(list(queries))
            ),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise NetnsError(
                f"client failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return json.loads(proc.stdout)  # type: ignore[no-any-return]

    def startQuery(self, *queries: dict[str, Any]) -> subprocess.Popen[str]:
        """
        Like L{query} but returns the running client; read its stdout with
        L{finishQuery}.
        """
        assert self.client is not None
        return subprocess.Popen(
            self.client.argv(
                sys.executable, str(CLIENT_SCRIPT), json.dumps(list(queries))
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def finishQuery(
        proc: subprocess.Popen[str], timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise NetnsError("client did not finish in time") from None
        if proc.returncode != 0:
            raise NetnsError(f"client failed ({proc.returncode}): {err.strip()}")
        return json.loads(out)  # type: ignore[no-any-return]

    #: Addresses that are nobody's: the client routes them to the server,
    #: whose TPROXY rule (L{redirect}) hands their datagrams to a listener.
    FOREIGN_V4 = "198.51.100.0/24"
    FOREIGN_V6 = "2001:db8:77::/64"

    def routeForeign(self) -> None:
        """
        What a C{TPROXY} rule needs besides the rule: the client routes
        L{FOREIGN_V4} and L{FOREIGN_V6} to the server, whose policy routing
        delivers locally what a rule marked (mark 1).
        """
        assert self.server is not None and self.client is not None
        for family, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
            self.server.ip(family, "rule", "add", "fwmark", "1", "lookup", "100")
            self.server.ip(
                family, "route", "add", "local", default, "dev", "lo", "table", "100"
            )
        self.client.ip("route", "add", self.FOREIGN_V4, "via", self.SERVER_V4)
        self.client.ip("-6", "route", "add", self.FOREIGN_V6, "via", self.SERVER_V6)

    def redirect(self, toPort: int, localPorts: tuple[int, ...] = ()) -> None:
        """
        Add a transparent proxy to the server namespace: an nftables C{TPROXY}
        rule hands every UDP datagram arriving on the veth for L{FOREIGN_V4}
        or L{FOREIGN_V6} (any port but C{toPort}), and for the server's
        primary addresses on C{localPorts}, to the socket on C{toPort}, with
        the policy routing TPROXY needs; the client routes the foreign
        prefixes to the server.  Datagrams from the server namespace itself
        are not redirected.
        """
        assert self.server is not None
        self.routeForeign()
        to = f"tproxy ip to :{toPort} meta mark set 1 accept"
        to6 = f"tproxy ip6 to :{toPort} meta mark set 1 accept"
        iif = f'iifname "{self.SERVER_IF}" meta l4proto udp'
        rules = [
            f"{iif} ip daddr {self.FOREIGN_V4} udp dport != {toPort} {to}",
            f"{iif} ip6 daddr {self.FOREIGN_V6} udp dport != {toPort} {to6}",
        ]
        if localPorts:
            ports = ", ".join(str(p) for p in localPorts)
            rules += [
                f"{iif} ip daddr {self.SERVER_V4} udp dport {{ {ports} }} {to}",
                f"{iif} ip6 daddr {self.SERVER_V6} udp dport {{ {ports} }} {to6}",
            ]
        body = "\n".join(f"    {rule}" for rule in rules)
        self.server.nft(
            "table inet udpdst_tproxy {\n"
            "  chain prerouting {\n"
            "    type filter hook prerouting priority mangle; policy accept;\n"
            f"{body}\n"
            "  }\n"
            "}\n"
        )

    def ifindex(self, ns: Namespace, ifname: str) -> int:
        return int(json.loads(ns.ip("-j", "link", "show", ifname).stdout)[0]["ifindex"])

    def stopServers(self) -> None:
        while self._processes:
            self._processes.pop().stop()

    def delete(self) -> None:
        """
        Stop the servers started here, then delete both namespaces (which
        removes the veth pair with them).
        """
        try:
            self.stopServers()
        finally:
            for ns in (self.server, self.client):
                if ns is not None:
                    ns.delete()


class Fleet:
    """
    A service address (VIP) on several hosts behind a router that spreads
    client flows over them, as anycast with ECMP or a balancer in direct
    server return mode does::

        client c0: 10.20.0.2/24, fd20::2/64 -- router r0: .1, ::1
        router rI: 10.21.I.1/24, fd21:I::1/64 -- host I h0: .2, ::2
        each host's lo: VIP_V4/32, VIP_V6/128

    The router has one route to the VIP with a next hop per host, hashed on
    the flow's addresses and ports (C{fib_multipath_hash_policy=1}); each
    host's default route points back at the router, so replies go back
    directly.  L{withdraw} takes a host out of the route.
    """

    VIP_V4 = "192.0.2.100"
    VIP_V6 = "fd99::100"
    CLIENT_V4 = "10.20.0.2"
    CLIENT_V6 = "fd20::2"

    def __init__(self, hosts: int) -> None:
        self.count = hosts
        self.router: Namespace | None = None
        self.client: Namespace | None = None
        self.hosts: list[Namespace] = []
        self._processes: list[ServerProcess] = []

    @classmethod
    def create(cls, hosts: int) -> Fleet:
        fleet = cls(hosts)
        try:
            fleet._build()
        except BaseException:
            fleet.delete()
            raise
        return fleet

    @staticmethod
    def hostV4(index: int) -> str:
        return f"10.21.{index}.2"

    @staticmethod
    def hostV6(index: int) -> str:
        return f"fd21:{index}::2"

    def _build(self) -> None:
        self.router = router = Namespace.create()
        self.client = client = Namespace.create()
        links = [(client, "c0", "r0", "10.20.0", "fd20:")]
        for index in range(1, self.count + 1):
            host = Namespace.create()
            self.hosts.append(host)
            links.append((host, "h0", f"r{index}", f"10.21.{index}", f"fd21:{index}:"))
        for ns, inside, outside, v4, v6 in links:
            router.ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            router.ip("link", "set", inside, "netns", ns.name)
            for where, ifname, last in ((router, outside, "1"), (ns, inside, "2")):
                where.ip("link", "set", "lo", "up")
                where.ip("link", "set", ifname, "addrgenmode", "none")
                where.ip("addr", "add", f"{v4}.{last}/24", "dev", ifname)
                where.ip("addr", "add", f"{v6}:{last}/64", "dev", ifname, "nodad")
                # Neighbour discovery for forwarded packets needs one.
                where.ip("addr", "add", f"fe80::{last}/64", "dev", ifname, "nodad")
                where.ip("link", "set", ifname, "up")
            ns.ip("route", "add", "default", "via", f"{v4}.1")
            ns.ip("-6", "route", "add", "default", "via", f"{v6}:1")
        # After the links: an interface takes IPv6 forwarding from "all"
        # only when it is set.
        router.sysctl("net.ipv4.ip_forward", "1")
        router.sysctl("net.ipv6.conf.all.forwarding", "1")
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1")
        router.sysctl("net.ipv6.fib_multipath_hash_policy", "1")
        for host in self.hosts:
            host.ip("addr", "add", f"{self.VIP_V4}/32", "dev", "lo")
            host.ip("addr", "add", f"{self.VIP_V6}/128", "dev", "lo", "nodad")
        self.route(range(1, self.count + 1))

    def route(self, hosts: Iterable[int]) -> None:
        """
        Route the VIP to C{hosts} (numbered from 1) on the router.
        """
        assert self.router is not None
        hops = list(hosts)
        for family, vip, gateway in (
            ("-4", f"{self.VIP_V4}/32", self.hostV4),
            ("-6", f"{self.VIP_V6}/128", self.hostV6),
        ):
            nexthops: list[str] = []
            for index in hops:
                nexthops += ["nexthop", "via", gateway(index)]
            if len(hops) == 1:
                nexthops = ["via", gateway(hops[0])]
            self.router.ip(family, "route", "replace", vip, *nexthops)

    def withdraw(self, index: int) -> None:
        """
        Take host C{index} out of the VIP's route, as a balancer's health
        check or a routing daemon's withdrawal would.
        """
        self.route(i for i in range(1, self.count + 1) if i != index)

    def startServer(
        self, index: int, *args: str, timeout: float = 10.0
    ) -> ServerProcess:
        """
        Start L{SERVER_SCRIPT} on host C{index} and wait until it listens.
        """
        proc = ServerProcess(
            self.hosts[index - 1].argv(sys.executable, str(SERVER_SCRIPT), *args)
        )
        self._processes.append(proc)
        proc.waitReady(timeout)
        return proc

    def query(self, queries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """
        Run L{CLIENT_SCRIPT} in the client namespace with C{queries}, for at
        most as long as all their timeouts.
        """
        assert self.client is not None
        timeout = 10.0 + sum(q.get("timeout", 2.0) for q in queries)
        out = self.client.run(
            sys.executable, str(CLIENT_SCRIPT), json.dumps(queries), timeout=timeout
        )
        return json.loads(out)  # type: ignore[no-any-return]

    def delete(self) -> None:
        try:
            while self._processes:
                self._processes.pop().stop()
        finally:
            for ns in (self.client, self.router, *self.hosts):
                if ns is not None:
                    ns.delete()


class ServerProcess:
    """
    L{SERVER_SCRIPT} running in a namespace; its stdout lines are read by a
    thread so that every wait on them is bounded.
    """

    def __init__(self, argv: list[str]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.port: int | None = None
        self.counters: dict[str, Any] | None = None
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def waitFor(self, kind: str, timeout: float) -> str:
        """
        Wait (bounded) for the next line starting with C{kind}; return the
        rest of it.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NetnsError(
                    f"server: no {kind} within {timeout}s; saw {self.seen}"
                )
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=5)
                self.stderr = self.proc.stderr.read() if self.proc.stderr else ""
                raise NetnsError(
                    f"server exited ({self.proc.returncode}) before {kind}; "
                    f"saw {self.seen}; stderr:\n{self.stderr}"
                )
            self.seen.append(line)
            head, _, rest = line.partition(" ")
            if head == kind:
                return rest

    def waitForCount(self, kind: str, count: int, timeout: float) -> list[str]:
        """
        Wait (bounded) until C{count} lines of C{kind} have been seen in all;
        return them.  A reply the client gave up on may be written a little
        later on a loaded machine.
        """
        deadline = time.monotonic() + timeout
        found = self.events(kind)
        while len(found) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NetnsError(
                    f"server: {len(found)} {kind} lines, not {count}, within "
                    f"{timeout}s; saw {self.seen}"
                )
            self.waitFor(kind, remaining)
            found = self.events(kind)
        return found

    def waitReady(self, timeout: float) -> None:
        self.port = int(self.waitFor("READY", timeout))

    def stop(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """
        Close stdin so the server stops; wait for its final counters (bounded);
        terminate, then kill, this process (by its own PID) if it lingers.
        Return the counters.
        """
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.counters = json.loads(self.waitFor("COUNTERS", timeout))
            except (NetnsError, ValueError):
                pass
            for signal in (self.proc.terminate, self.proc.kill):
                try:
                    self.proc.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    signal()
            else:
                self.proc.wait(timeout=timeout)
        if self.proc.stderr is not None and not self.stderr:
            try:
                self.stderr = self.proc.stderr.read()
            except (OSError, ValueError):
                pass
        return self.counters

    def events(self, kind: str) -> list[str]:
        """
        The lines of C{kind} seen so far (drains what the reader has queued).
        """
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self.lines.put(None)
                break
            self.seen.append(line)
        return [
            line.partition(" ")[2]
            for line in self.seen
            if line.partition(" ")[0] == kind
        ]


def stopWhenStdinCloses(reactor: Any) -> Callable[[], None]:
    """
    In a helper process a test runs: stop C{reactor} when standard input
    ends (the test closed it, or died), read by a daemon thread.

    @return: The stop function used, which other stop conditions (a
        lifetime, a failure) may call too: it stops the reactor if it runs.
    """

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    def watchStdin() -> None:
        try:
            while os.read(sys.stdin.fileno(), 4096):
                pass
        except OSError:
            pass
        reactor.callFromThread(stop)

    threading.Thread(target=watchStdin, daemon=True).start()
    return stop
