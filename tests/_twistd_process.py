"""
Real C{twistd} subprocesses for the tests, and a connected client's view of
them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TWISTD = str(Path(sys.executable).with_name("twistd"))
REPO = Path(__file__).resolve().parent.parent

#: Bound on waiting for a twistd subprocess to answer at all.
START_TIMEOUT = 30.0


def freePort() -> int:
    """
    A port free for both UDP and TCP on every loopback address (twistd dns
    listens on both); bound to the wildcards so nothing else holds it.
    """
    while True:
        with (
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u,
            socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as t,
        ):
            u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            u.bind(("::", 0))
            port: int = u.getsockname()[1]
            try:
                t.bind(("::", port))
            except OSError:
                continue
            return port


class Twistd:
    """
    A C{twistd -n} subprocess in a scratch directory; L{stop} ends it by
    its own PID.
    """

    def __init__(self, cwd: Path, args: list[str]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
        )
        self.argv = [TWISTD, "-n", "--pidfile=", *args]
        self.logPath = cwd / "twistd.out"
        self._log = self.logPath.open("w")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def output(self) -> str:
        self._log.flush()
        return self.logPath.read_text()

    def waitAnswering(self, ask: Callable[[], object]) -> None:
        """
        Wait (bounded) until C{ask()} gets an answer: the server is up.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.argv} exited ({self.proc.returncode}):\n{self.output()}"
                )
            if ask():
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.argv} did not answer in {START_TIMEOUT}s:\n{self.output()}"
                )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


@contextmanager
def twistd(cwd: Path, *args: str) -> Iterator[Twistd]:
    """
    Run C{twistd -n --pidfile= ARGS} in C{cwd}; stop it (by its PID) on
    leaving.
    """
    process = Twistd(cwd, list(args))
    try:
        yield process
    finally:
        process.stop()
