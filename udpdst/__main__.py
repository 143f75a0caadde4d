"""
The C{udpdst} command (also C{python -m udpdst}): C{check} probes this host's
addresses on an echo port, C{check-config} validates a config file without
starting anything, C{example-config} prints the commented example config.

Exit status: 0 when all is well, 1 when the check or the config failed, 2
for a command-line mistake.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.resources import files
from typing import NoReturn

from udpdst.echo.config import Config, ConfigError, ListenConfig, loadConfig

EXAMPLE_CONFIG = "data/udpdst.toml"


class _Parser(argparse.ArgumentParser):
    """
    Command-line mistakes as one line and status 2, not a usage block.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _portNumber(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port 1..65535")
    return int(text)


def _versionLine() -> str:
    """
    What C{udpdst --version} prints, as C{twistd udpdst --version} does.
    """
    from twisted import copyright

    from udpdst import __version__

    return f"udpdst {__version__} (Twisted {copyright.version})"


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="udpdst",
        description="Tools for the udpdst UDP echo service.",
    )
    top.add_argument(
        "--version",
        action="version",
        version=_versionLine(),
        help="print udpdst's version (and Twisted's) and exit",
    )
    commands = top.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    check = commands.add_parser(
        "check",
        help="probe every local address on an echo port",
        description=(
            "Probe every address of this host (every interface, IPv4 and "
            "IPv6) on a UDP echo port, each from a connected socket, and "
            "print which answered from the address asked. This sends one "
            "small datagram to each local address (up to three if "
            "unanswered). Exit 0 when all answered from themselves, 1 "
            "otherwise."
        ),
    )
    where = check.add_mutually_exclusive_group()
    where.add_argument(
        "--config",
        metavar="FILE",
        help="probe the ports of this config file's listeners",
    )
    where.add_argument(
        "--port",
        type=_portNumber,
        help="probe this port on every address (default: the default "
        f"listener's, {ListenConfig().port})",
    )
    check.add_argument(
        "--timeout",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="seconds to wait for all answers (default: 2)",
    )
    checkConfig = commands.add_parser(
        "check-config",
        help="validate a config file without starting anything",
        description="Validate a config file: exit 0 if twistd udpdst would "
        "accept it, else print why and exit 1.",
    )
    checkConfig.add_argument("file", metavar="FILE")
    commands.add_parser(
        "example-config",
        help="print the commented example config",
        description="Print the commented example config file.",
    )
    return top


def _fail(command: str, message: str) -> int:
    print(f"udpdst {command}: {message}", file=sys.stderr)
    return 1


def _check(options: argparse.Namespace) -> int:
    from udpdst import check

    if options.port is not None:
        config = Config(listen=(ListenConfig(port=options.port),))
    else:
        try:
            config = loadConfig(options.config)
        except ConfigError as e:
            return _fail("check", str(e))
    targets, notes = check.targetsOf(config)
    if not targets:
        return _fail("check", "; ".join(notes))
    try:
        return check.run(targets, notes, options.timeout)
    except check.CheckError as e:
        return _fail("check", str(e))


def _checkConfig(options: argparse.Namespace) -> int:
    try:
        config = loadConfig(options.file)
    except ConfigError as e:
        return _fail("check-config", str(e))
    listeners = ", ".join(listener.describe() for listener in config.listen)
    print(f"udpdst check-config: {options.file} is valid; listeners {listeners}")
    return 0


def _exampleConfig(options: argparse.Namespace) -> int:
    try:
        text = files("udpdst").joinpath(EXAMPLE_CONFIG).read_text(encoding="utf-8")
    except OSError as e:
        return _fail(
            "example-config",
            f"the example config is not installed with this package "
            f"({e.strerror}); reinstall udpdst",
        )
    sys.stdout.write(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    options = parser().parse_args(argv)
    run = {
        "check": _check,
        "check-config": _checkConfig,
        "example-config": _exampleConfig,
    }[options.command]
    return run(options)


if __name__ == "__main__":
    sys.exit(main())
