"""
The configuration of the udpdst echo service: its schema (keys, defaults,
types and validation, in this one place), the TOML loader, command-line
overrides, and the inverse of the loader (L{configDocument}).

Each table is a frozen dataclass; each field is a key of that table, and its
metadata holds the validator, the one-line description and, for keys that
have one, the name of the command-line option overriding it.  Table
parsing, the overrides and the options' help text (L{OPTIONS}) all read
that one description.  Every mistake a user can make raises L{ConfigError}
with one line naming the cause and the fix.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, TypeVar

from udpdst.address import formatHostPort, splitHostPort

#: The longest allowed echo prefix, in bytes once UTF-8 encoded.  Every reply
#: may be this much larger than its request (reflection amplification).
MAX_PREFIX = 1024

#: The most worker processes (C{[service] workers}).
MAX_WORKERS = 256

#: The highest rate (datagrams per second) and burst a limit may have: far
#: above what one process answers, and exact as floats.
MAX_RATE = 1e9
MAX_BURST = 10**9

#: The lowest rate a limit may have (one datagram per 1,000 s): a smaller
#: one would round its refill interval to infinity.
MIN_RATE = 0.001

#: The most sources (and networks) the rate limiters track: 16,777,216,
#: about 2.3 GB each at the figure the docs give per source.
MAX_SOURCES = 2**24

#: The longest stats interval, in seconds (a day).
MAX_STATS_INTERVAL = 86400.0

#: Log levels, in increasing order of severity (names of L{twisted.logger.LogLevel}).
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class ConfigError(Exception):
    """
    The configuration is wrong.  C{str(error)} is one line: what is wrong,
    where, and how to fix it.
    """


# Validators: each takes the raw value and the key's name for messages
# ("[limits] per_source_rate", "--prefix") and returns the converted value or
# raises ConfigError.

_Check = Callable[[Any, str], Any]


def _shown(value: Any) -> str:
    """
    A value as a message quotes it: at most about 40 characters, so that a
    number of thousands of digits still makes one readable line.
    """
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]}"


def _describe(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    return f"{kind} ({_shown(value)})" if not isinstance(value, list | dict) else kind


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, not {_describe(value)}")
    return value


def _integer(low: int, high: int) -> _Check:
    def check(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, not {_describe(value)}")
        if not low <= value <= high:
            raise ConfigError(
                f"{where} = {_shown(value)} is out of range; use {low}..{high}"
            )
        return value

    return check


def _number(low: float, high: float, zero: bool = False) -> _Check:
    """
    A number from C{low} to C{high}; with C{zero}, also C{0} (which then
    means "none" or "no limit").
    """
    span = f"{low:g}..{high:g}" + (", or 0" if zero else "")

    def check(value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, not {_describe(value)}")
        # An integer too large for a float is out of range, not an error.
        number = float(value) if abs(value) <= high else math.inf
        if not (low <= number <= high or (zero and number == 0)):
            raise ConfigError(f"{where} = {_shown(value)} is out of range; use {span}")
        return number

    return check


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{where} must be an integer port number, not {_describe(value)}"
        )
    if not 0 <= value <= 65535:
        raise ConfigError(
            f"{where} = {value} is out of range; use a port number 0..65535 "
            "(0 lets the kernel choose one)"
        )
    return value


def _address(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {_describe(value)}")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(
            f"{where}: bad address {value!r}; use an IP address such as "
            '"::" (all, IPv6 and IPv4), "0.0.0.0" (all IPv4) or "127.0.0.1"'
        ) from None
    return value


def _listenAddress(value: Any, where: str) -> str:
    address = _address(value, where)
    ip = ipaddress.ip_address(address)
    if ip.is_multicast or (ip.version == 4 and int(ip) >> 28 == 0xF):
        raise ConfigError(
            f"{where}: {address} is a multicast or broadcast address, which "
            "no reply can come from; bind a unicast address, or a wildcard "
            '("::", "0.0.0.0") to serve every address'
        )
    return address


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {_describe(value)}")
    return value


def _prefix(value: Any, where: str) -> str:
    text = _text(value, where)
    size = len(text.encode("utf-8"))
    if size > MAX_PREFIX:
        raise ConfigError(
            f"{where} is {size} bytes long; use at most {MAX_PREFIX} "
            "(every reply may be that much larger than its request)"
        )
    return text


def _level(value: Any, where: str) -> str:
    text = _text(value, where)
    level = text.lower()
    if level == "warning":
        level = "warn"
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"{where}: unknown log level {value!r}; use one of " + ", ".join(LOG_LEVELS)
        )
    return level


def _network(value: Any, where: str) -> _Network:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must hold CIDR strings, not {_describe(value)}")
    try:
        network = ipaddress.ip_network(value)
    except ValueError as e:
        if "host bits set" in str(e):
            fixed = ipaddress.ip_network(value, strict=False)
            raise ConfigError(
                f"{where}: {value!r} has host bits set; write {str(fixed)!r}"
            ) from None
        raise ConfigError(
            f"{where}: bad network {value!r}; use CIDR such as "
            '"192.0.2.0/24", "2001:db8::/32" or "10.1.2.3" (one host)'
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        raise ConfigError(
            f"{where}: {value!r} is an IPv4-mapped range; write it as IPv4 "
            "(IPv4 clients of a dual-stack listener are matched as IPv4)"
        )
    return network


def _listOf(item: _Check) -> _Check:
    def check(value: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be an array, not {_describe(value)}")
        return tuple(item(v, where) for v in value)

    return check


def _choice(*choices: str) -> _Check:
    def check(value: Any, where: str) -> str:
        if value not in choices:
            raise ConfigError(
                f"{where}: {value!r} is not one of " + ", ".join(map(repr, choices))
            )
        return str(value)

    return check


def _workers(value: Any, where: str) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f'{where} must be an integer or "auto", not {_describe(value)}'
        )
    if not 1 <= value <= MAX_WORKERS:
        raise ConfigError(
            f"{where} = {_shown(value)} is out of range; use 1..{MAX_WORKERS}, "
            'or "auto" (one per CPU)'
        )
    return value


def _hostPort(text: str, where: str, shape: str) -> tuple[str, int]:
    try:
        host, rest = splitHostPort(text)
    except ValueError:
        raise ConfigError(shape) from None
    try:
        port = int(rest, 10)
    except ValueError:
        raise ConfigError(shape) from None
    return _address(host, f"{where} {text}"), _port(port, f"{where} {text}: port")


def _endpoint(value: Any, where: str) -> str:
    text = _text(value, where)
    if text:
        _hostPort(
            text,
            where,
            f"{where} {text!r}: use ADDRESS:PORT, with IPv6 in brackets "
            '("127.0.0.1:9135", "[::1]:9135"), or "" for none',
        )
    return text


def _key(default: Any, check: _Check, doc: str, option: str | None = None) -> Any:
    """
    A key of a table: its default, its validator, its description and the
    command-line option that overrides it, if any.
    """
    return field(
        default=default, metadata={"check": check, "doc": doc, "option": option}
    )


# The schema.


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """
    One C{[[listen]]} entry: a UDP socket to serve.
    """

    address: str = _key(
        "::",
        _listenAddress,
        'address to bind; "::" = all IPv6 and IPv4 (dual-stack)',
    )
    port: int = _key(12345, _port, "UDP port; 0 = any free port (logged at start)")
    reuse_port: bool = _key(
        False, _boolean, "SO_REUSEPORT: let several processes share the port"
    )  # --reuse-port sets it on every listener: see withOverrides
    receive_buffer: int = _key(
        0, _integer(0, 2**31 - 1), "SO_RCVBUF in bytes; 0 = kernel default"
    )
    v6_only: bool = _key(False, _boolean, 'with address "::", serve IPv6 only')
    max_packet_size: int = _key(
        65535, _integer(1, 65535), "largest datagram echoed; larger ones are dropped"
    )
    systemd: bool = _key(
        False, _boolean, "use sockets passed by systemd instead of binding"
    )
    fd_name: str = _key(
        "", _text, "with systemd: only the sockets with this FileDescriptorName="
    )
    transparent: bool = _key(
        False,
        _boolean,
        "IP_TRANSPARENT: serve what a TPROXY rule redirects, replying from the "
        "original address and port (needs CAP_NET_ADMIN)",
    )
    reply_sockets: int = _key(
        256,
        _integer(1, 65536),
        "with transparent: the most reply sockets kept open (one descriptor each)",
    )
    reply_socket_idle: float = _key(
        60.0,
        _number(0.001, 86400.0),
        "with transparent: seconds an unused reply socket stays open",
    )

    def describe(self) -> str:
        """
        How this listener is named in log lines: C{[::]:12345}, or
        C{systemd} / C{systemd:NAME} for inherited sockets.
        """
        if self.systemd:
            return f"systemd:{self.fd_name}" if self.fd_name else "systemd"
        return formatHostPort(self.address, self.port)


@dataclass(frozen=True, slots=True)
class EchoConfig:
    """
    The C{[echo]} table.
    """

    prefix: str = _key(
        "",
        _prefix,
        'text put before every reply; "" = the exact bytes (RFC 862); '
        "requests shorter than it less 28 bytes are not answered",
        option="prefix",
    )
    answer_broadcast: bool = _key(
        False,
        _boolean,
        "answer datagrams sent to broadcast or multicast addresses (every "
        "host on the link answers one spoofed datagram: for labs only)",
    )

    @property
    def prefixBytes(self) -> bytes:
        return self.prefix.encode("utf-8")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """
    The C{[limits]} table: who gets an answer, and how often.
    """

    per_source_rate: float = _key(
        1000.0,
        _number(MIN_RATE, MAX_RATE, zero=True),
        "datagrams per second answered per source; 0 = no limit",
    )
    per_source_burst: int = _key(
        2000,
        _integer(1, MAX_BURST),
        "datagrams a source may send at once above the rate",
    )
    per_prefix_rate: float = _key(
        2000.0,
        _number(MIN_RATE, MAX_RATE, zero=True),
        "datagrams per second answered per source network (prefix_v4, "
        "prefix_v6), all its sources together; 0 = no limit",
    )
    per_prefix_burst: int = _key(
        4000,
        _integer(1, MAX_BURST),
        "datagrams a source network may send at once above its rate",
    )
    prefix_v4: int = _key(
        24, _integer(0, 32), "prefix length of an IPv4 source network"
    )
    prefix_v6: int = _key(
        56, _integer(0, 128), "prefix length of an IPv6 source network"
    )
    max_sources: int = _key(
        65536,
        _integer(1, MAX_SOURCES),
        "sources, and source networks, whose rate is tracked; the longest "
        "unseen are forgotten",
    )
    allow: tuple[_Network, ...] = _key(
        (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")),
        _listOf(_network),
        "source networks answered",
    )
    deny: tuple[_Network, ...] = _key(
        (), _listOf(_network), "source networks never answered (wins over allow)"
    )
    deny_source_ports: tuple[int, ...] = _key(
        (0, 7, 13, 17, 19, 37), _listOf(_port), "source ports never answered"
    )
    deny_same_port: bool = _key(
        True, _boolean, "never answer a source port equal to the listening port"
    )


@dataclass(frozen=True, slots=True)
class LogConfig:
    """
    The C{[log]} table.
    """

    level: str = _key(
        "info",
        _level,
        "one of debug, info, warn, error, critical",
        option="log-level",
    )
    stats_interval: float = _key(
        60.0,
        _number(1e-3, MAX_STATS_INTERVAL, zero=True),
        "seconds between stats lines; 0 = only at stop",
        option="stats-interval",
    )
    format: str = _key(
        "text",
        _choice("text", "json"),
        "format: text (default) or json, one JSON object per line",
        option="log-format",
    )


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """
    The C{[service]} table: how the service runs.
    """

    workers: int | str = _key(
        1,
        _workers,
        'processes serving the listeners; "auto" = one per CPU',
        option="workers",
    )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """
    The C{[metrics]} table: the Prometheus endpoint.
    """

    listen: str = _key(
        "",
        _endpoint,
        'ADDRESS:PORT serving /metrics (needs the metrics extra); "" = none',
        option="metrics",
    )

    @property
    def endpoint(self) -> tuple[str, int]:
        """
        C{listen} as C{(address, port)}; only if it is not empty.
        """
        return _hostPort(self.listen, "[metrics] listen", "")


def _defaultListeners() -> tuple[ListenConfig, ...]:
    return (ListenConfig(),)


@dataclass(frozen=True, slots=True)
class Config:
    """
    The whole configuration.  C{Config()} is the embedded default: one
    dual-stack listener on C{[::]:12345}.
    """

    listen: tuple[ListenConfig, ...] = field(default_factory=_defaultListeners)
    echo: EchoConfig = field(default_factory=EchoConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


#: The tables of a config file, and the dataclass of each (the field of
#: L{Config} of the same name).  C{listen} is an array of tables.
TABLES: dict[str, type] = {
    "listen": ListenConfig,
    "echo": EchoConfig,
    "limits": LimitsConfig,
    "log": LogConfig,
    "service": ServiceConfig,
    "metrics": MetricsConfig,
}

_T = TypeVar("_T")


def _fill(table: type[_T], raw: Mapping[str, Any], where: str) -> _T:
    known = {f.name: f for f in fields(table)}  # type: ignore[arg-type]
    for name in raw:
        if name not in known:
            raise ConfigError(
                f"{where}: unknown key {name!r}; known keys are " + ", ".join(known)
            )
    values = {
        name: known[name].metadata["check"](value, f"{where} {name}")
        for name, value in raw.items()
    }
    return table(**values)


def _checkListener(listener: ListenConfig, where: str) -> ListenConfig:
    if listener.fd_name and not listener.systemd:
        raise ConfigError(f"{where}: fd_name needs systemd = true")
    if listener.v6_only and listener.address != "::":
        raise ConfigError(f'{where}: v6_only only applies to address "::"')
    return listener


def _checkLimits(limits: LimitsConfig) -> LimitsConfig:
    # Port 0 is never a real peer: always refused, whatever the list says.
    ports = tuple(sorted(set(limits.deny_source_ports) | {0}))
    return replace(limits, deny_source_ports=ports)


def parseConfig(document: Mapping[str, Any], source: str = "config") -> Config:
    """
    Build a L{Config} from a parsed TOML document.

    @param document: The document, as L{tomllib} returns it.
    @param source: How to name the document in messages (its path).
    @raise ConfigError: Anything is wrong.
    """
    for name, value in document.items():
        if name not in TABLES:
            raise ConfigError(
                f"{source}: unknown table or key {name!r}; known tables are "
                + ", ".join(f"[[{t}]]" if t == "listen" else f"[{t}]" for t in TABLES)
            )
        if name == "listen":
            if not isinstance(value, list):
                raise ConfigError(
                    f"{source}: listen must be an array of tables; write "
                    "[[listen]] (double brackets) before each listener"
                )
        elif not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a table; write [{name}]")
    listeners: tuple[ListenConfig, ...] = _defaultListeners()
    if "listen" in document:
        found = []
        for i, raw in enumerate(document["listen"], 1):
            where = f"{source}: [[listen]] #{i}"
            if not isinstance(raw, dict):
                raise ConfigError(f"{where} must be a table")
            found.append(_checkListener(_fill(ListenConfig, raw, where), where))
        if not found:
            raise ConfigError(
                f"{source}: listen is empty; add at least one [[listen]] table"
            )
        listeners = tuple(found)
    tables: dict[str, Any] = {
        name: _fill(table, document.get(name, {}), f"{source}: [{name}]")
        for name, table in TABLES.items()
        if name != "listen"
    }
    tables["limits"] = _checkLimits(tables["limits"])
    return Config(listen=listeners, **tables)


def loadConfig(path: str | None = None) -> Config:
    """
    Read a config file; with no path, the embedded default.

    @raise ConfigError: The file cannot be read, is not valid TOML, or holds
        a wrong key or value.
    """
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        # No "--config" here: udpdst check-config names the file as an argument.
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}; fix the syntax there") from None
    except RecursionError:
        raise ConfigError(
            f"{path}: invalid TOML: arrays or tables nested too deep; "
            "nest them a few levels at most"
        ) from None
    except ValueError as e:
        # Python's own limits, e.g. an integer of thousands of digits.
        cause = str(e).partition(";")[0]
        raise ConfigError(
            f"{path}: invalid TOML: {cause}; fix the value there"
        ) from None
    return parseConfig(document, path)


def parseListen(text: str, where: str = "--listen") -> ListenConfig:
    """
    Parse a command-line listener: C{ADDRESS:PORT} with IPv6 in brackets
    (C{[::]:7}, C{0.0.0.0:7}, C{[fe80::1%eth0]:7}), or C{systemd} /
    C{systemd:NAME} for sockets passed by systemd; either followed by
    C{,transparent} for C{transparent = true}.

    @raise ConfigError: C{text} is not one of those.
    """
    spec, comma, flag = text.partition(",")
    if comma and flag != "transparent":
        raise ConfigError(
            f"{where} {text!r}: the only option after a comma is transparent "
            "([::]:7000,transparent)"
        )
    transparent = bool(comma)
    if spec == "systemd":
        return ListenConfig(systemd=True, transparent=transparent)
    if spec.startswith("systemd:"):
        return ListenConfig(
            systemd=True, fd_name=spec[len("systemd:") :], transparent=transparent
        )
    shape = (
        f"{where} {text!r}: use ADDRESS:PORT, with IPv6 in brackets "
        "([::]:12345, 0.0.0.0:12345), or systemd[:NAME]; add ,transparent for "
        "a TPROXY listener"
    )
    address, port = _hostPort(spec, where, shape)
    return ListenConfig(
        address=_listenAddress(address, where), port=port, transparent=transparent
    )


#: The help text of the two options that are not one key: C{--listen} (a
#: whole listener) and C{--reuse-port} (a key of every listener).
LISTEN_HELP = (
    "ADDRESS:PORT to listen on, IPv6 in brackets ([::]:7, 0.0.0.0:7), or "
    "systemd[:NAME] for sockets passed by systemd; append ,transparent for "
    "a TPROXY listener ([::]:7000,transparent). Repeat for more; "
    "replaces the config file's listeners."
)
REUSE_PORT_HELP = "Set reuse_port on every listener (SO_REUSEPORT)."


@dataclass(frozen=True, slots=True)
class Option:
    """
    A command-line option that overrides one key of a table.

    @ivar name: The option, without C{--}.
    @ivar table: The table's name in L{TABLES} (and field of L{Config}).
    @ivar key: The key in that table.
    @ivar help: The key's description, as a sentence for C{--help}.
    """

    name: str
    table: str
    key: str
    help: str


def _options() -> tuple[Option, ...]:
    return tuple(
        Option(
            f.metadata["option"],
            name,
            f.name,
            f.metadata["doc"][:1].upper() + f.metadata["doc"][1:] + ".",
        )
        for name, table in TABLES.items()
        for f in fields(table)
        if f.metadata.get("option")
    )


#: Every option that overrides one key, read from the schema.
OPTIONS = _options()


def _fromText(text: str, default: Any) -> Any:
    """
    A command-line value as the TOML value it stands for, for the key's
    validator to check: text for keys whose default is text, else a number
    if it reads as one (the validator then names what is wrong).
    """
    if isinstance(default, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def withOverrides(
    config: Config,
    values: Mapping[str, str | None] | None = None,
    listen: Iterable[str] = (),
    reusePort: bool = False,
) -> Config:
    """
    Apply command-line options: those of L{OPTIONS} (C{values}, by option
    name; L{None} = not given), C{--listen} (replaces the file's
    listeners) and C{--reuse-port} (sets C{reuse_port} on every listener
    that binds).  Values are checked by the same validators as the file's.

    @raise ConfigError: A value is wrong.
    """
    listeners = tuple(parseListen(text) for text in listen)
    if listeners:
        config = replace(config, listen=listeners)
    if reusePort:
        config = replace(
            config,
            listen=tuple(
                lc if lc.systemd else replace(lc, reuse_port=True)
                for lc in config.listen
            ),
        )
    for option in OPTIONS:
        text = (values or {}).get(option.name)
        if text is None:
            continue
        table = getattr(config, option.table)
        key = {f.name: f for f in fields(table)}[option.key]
        value = key.metadata["check"](_fromText(text, key.default), f"--{option.name}")
        config = replace(
            config, **{option.table: replace(table, **{option.key: value})}
        )
    return config


# The inverse of parseConfig: a configuration as a plain document (what the
# parent sends its workers).


def _plain(value: Any) -> Any:
    if isinstance(value, _Network):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return value


def configDocument(config: Any) -> dict[str, Any]:
    """
    A L{udpdst.echo.config.Config} as the document (tables of plain values) that
    L{udpdst.echo.config.parseConfig} reads back to an equal configuration.
    """
    document = _plain(config)
    assert isinstance(document, dict)
    return document
