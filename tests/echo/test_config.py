"""
Tests for udpdst.echo.config and the command-line options of udpdst.echo.tap: every
key's default, every kind of mistake (one line, no traceback), and overrides.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import ipaddress
import tomllib
from pathlib import Path

import pytest
from twisted.python import usage

from tests._service_helpers import REPO
from udpdst.echo.config import (
    OPTIONS,
    TABLES,
    Config,
    ConfigError,
    EchoConfig,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    MetricsConfig,
    ServiceConfig,
    loadConfig,
    parseListen,
)
from udpdst.echo.tap import Options

#: The example config and the units, shipped in the package.
DATA = importlib.resources.files("udpdst").joinpath("data")
EXAMPLE = DATA.joinpath("udpdst.toml")
DATA_FILES = ("udpdst.toml", "udpdst.service", "udpdst@.service", "udpdst.socket")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "udpdst.toml"
    path.write_text(text)
    return str(path)


def parse(args: list[str], environ: dict[str, str] | None = None) -> Options:
    options = Options(environ={} if environ is None else environ)
    options.parseOptions(args)
    return options


# Defaults


def test_embeddedDefault() -> None:
    """
    No config file: one dual-stack listener on [::]:12345, datagrams up to
    the UDP maximum, no prefix, and the documented limits.
    """
    config = loadConfig(None)
    assert config == Config()
    (listener,) = config.listen
    assert (listener.address, listener.port) == ("::", 12345)
    assert listener.v6_only is False
    assert listener.reuse_port is False
    assert listener.receive_buffer == 0
    assert listener.max_packet_size == 65535
    assert listener.systemd is False and listener.fd_name == ""
    assert config.echo.prefix == ""
    assert config.limits.per_source_rate == 1000
    assert config.limits.per_source_burst == 2000
    assert config.limits.max_sources == 65536
    assert config.limits.allow == (
        ipaddress.ip_network("0.0.0.0/0"),
        ipaddress.ip_network("::/0"),
    )
    assert config.limits.deny == ()
    assert config.limits.deny_source_ports == (0, 7, 13, 17, 19, 37)
    assert config.limits.deny_same_port is True
    assert config.log.level == "info"
    assert config.log.stats_interval == 60


def test_emptyFileIsTheDefault(tmp_path: Path) -> None:
    assert loadConfig(write(tmp_path, "")) == Config()


def test_exampleFileHasEveryKeyAtItsDefault() -> None:
    """
    The example config shipped in the package names every key of the
    schema, each at its default.
    """
    document = tomllib.loads(EXAMPLE.read_text())
    assert set(document) == set(TABLES)
    for name, table in TABLES.items():
        raw = document[name][0] if name == "listen" else document[name]
        assert set(raw) == {f.name for f in dataclasses.fields(table)}, name
    with importlib.resources.as_file(EXAMPLE) as path:
        assert loadConfig(str(path)) == Config()


@pytest.mark.parametrize("name", DATA_FILES)
def test_etcKeepsCopiesOfThePackageData(name: str) -> None:
    """
    etc/ holds copies of the example config and units for readers of the
    repository; the package's are the ones installed.
    """
    etc = REPO / "etc" / name
    assert etc.read_text() == DATA.joinpath(name).read_text()


def test_everyTableIsAFieldOfConfig() -> None:
    assert {f.name for f in dataclasses.fields(Config)} == set(TABLES)


def test_everyKeyOverridden(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[listen]]
address = "127.0.0.1"
port = 7
reuse_port = true
receive_buffer = 1048576
max_packet_size = 1500

[[listen]]
address = "::"
port = 7
v6_only = true

[[listen]]
systemd = true
fd_name = "echo"

[[listen]]
port = 7000
transparent = true
reply_sockets = 1024
reply_socket_idle = 5

[echo]
prefix = "héllo "

[limits]
per_source_rate = 2.5
per_source_burst = 5
max_sources = 10
allow = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
deny = ["10.9.0.0/16"]
deny_source_ports = [7, 19, 53]
deny_same_port = false

[log]
level = "DEBUG"
stats_interval = 0.5

[service]
workers = 3

[metrics]
listen = "[::1]:9135"
""",
    )
    config = loadConfig(path)
    assert config.service == ServiceConfig(workers=3)
    assert config.metrics == MetricsConfig(listen="[::1]:9135")
    assert config.listen == (
        ListenConfig("127.0.0.1", 7, True, 1048576, False, 1500),
        ListenConfig("::", 7, v6_only=True),
        ListenConfig(systemd=True, fd_name="echo"),
        ListenConfig(
            port=7000, transparent=True, reply_sockets=1024, reply_socket_idle=5.0
        ),
    )
    assert config.echo == EchoConfig("héllo ")
    assert config.echo.prefixBytes == "héllo ".encode()
    assert config.limits == LimitsConfig(
        per_source_rate=2.5,
        per_source_burst=5,
        max_sources=10,
        allow=tuple(
            map(ipaddress.ip_network, ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"])
        ),
        deny=(ipaddress.ip_network("10.9.0.0/16"),),
        # Port 0 is always refused, even when the list leaves it out.
        deny_source_ports=(0, 7, 19, 53),
        deny_same_port=False,
    )
    assert config.log == LogConfig("debug", 0.5)


# Mistakes: each gives a ConfigError whose message is one line naming the
# cause and the fix.

BAD_FILES = [
    (
        "[limits]\nper_source_rat = 5\n",
        "unknown key 'per_source_rat'",
        "per_source_rate",
    ),
    ("[[listen]]\nadress = '::'\n", "unknown key 'adress'", "address"),
    ("[echoes]\nprefix = 'x'\n", "unknown table or key 'echoes'", "[echo]"),
    ("port = 7\n", "unknown table or key 'port'", "[[listen]]"),
    ("[listen]\nport = 7\n", "array of tables", "[[listen]]"),
    ("listen = []\n", "listen is empty", "[[listen]]"),
    ("[echo]\nprefix = 5\n", "prefix must be a string", "an integer"),
    ("[[listen]]\nport = '7'\n", "must be an integer port number", "a string"),
    ("[[listen]]\nport = true\n", "must be an integer port number", "a boolean"),
    ("[[listen]]\ntransparent = 'yes'\n", "must be true or false", "a string"),
    ("[[listen]]\nreply_sockets = 0\n", "out of range", "1..65536"),
    ("[[listen]]\nreply_socket_idle = 0\n", "out of range", "0.001..86400"),
    ("[[listen]]\nreuse_port = 1\n", "must be true or false", "an integer"),
    ("[limits]\nper_source_rate = 'fast'\n", "must be a number", "a string"),
    ("[limits]\nper_source_rate = -1\n", "out of range", "0.001..1e+09, or 0"),
    ("[limits]\nper_source_burst = 0\n", "out of range", "1..1000000000"),
    ("[limits]\nallow = '10.0.0.0/8'\n", "must be an array", "a string"),
    ("[[listen]]\naddress = 'localhost'\n", "bad address 'localhost'", "0.0.0.0"),
    ("[[listen]]\naddress = '10.1.2.300'\n", "bad address", '"::"'),
    ("[[listen]]\nport = 70000\n", "port = 70000 is out of range", "0..65535"),
    ("[[listen]]\nport = -1\n", "port = -1 is out of range", "0..65535"),
    ("[limits]\ndeny_source_ports = [7, 65536]\n", "65536 is out of range", "0..65535"),
    ("[[listen]]\nmax_packet_size = 70000\n", "out of range", "1..65535"),
    ("[limits]\ndeny = ['10.1.2.3/8']\n", "host bits set", "'10.0.0.0/8'"),
    ("[limits]\nallow = ['10.0.0.0/33']\n", "bad network", "CIDR"),
    ("[limits]\ndeny = ['::ffff:10.0.0.0/104']\n", "IPv4-mapped", "as IPv4"),
    ("[log]\nlevel = 'loud'\n", "unknown log level 'loud'", "debug, info"),
    ("[echo]\nprefix = '" + "x" * 1025 + "'\n", "1025 bytes", "at most 1024"),
    ("[[listen]]\nfd_name = 'echo'\n", "fd_name needs systemd = true", "systemd"),
    ("[[listen]]\naddress = '0.0.0.0'\nv6_only = true\n", "v6_only", '"::"'),
    ("[log]\nstats_interval = nan\n", "out of range", "0.001..86400, or 0"),
    ("[log]\nformat = 'xml'\n", "'xml' is not one of 'text', 'json'", "format"),
    ("[service]\nworkers = 0\n", "workers = 0 is out of range", '"auto"'),
    ("[service]\nworkers = 'many'\n", 'must be an integer or "auto"', "a string"),
    ("[metrics]\nlisten = '9135'\n", "use ADDRESS:PORT", "127.0.0.1:9135"),
    ("[metrics]\nlisten = 'localhost:9135'\n", "bad address", "127.0.0.1"),
    ("[metrics]\nlisten = '127.0.0.1:70000'\n", "out of range", "0..65535"),
]


@pytest.mark.parametrize("text, cause, fix", BAD_FILES)
def test_badFile(tmp_path: Path, text: str, cause: str, fix: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        loadConfig(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(path)
    assert cause in message
    assert fix in message


def test_invalidTomlNamesTheLine(tmp_path: Path) -> None:
    path = write(tmp_path, '[echo]\nprefix = "x"\n\n[limits]\nper_source_rate = = 5\n')
    with pytest.raises(ConfigError) as info:
        loadConfig(path)
    message = str(info.value)
    assert "\n" not in message
    assert "invalid TOML" in message
    assert "line 5" in message


def test_duplicateKeyIsInvalidToml(tmp_path: Path) -> None:
    path = write(tmp_path, "[echo]\nprefix = 'a'\nprefix = 'b'\n")
    with pytest.raises(ConfigError, match="invalid TOML.*line 3"):
        loadConfig(path)


def test_notUtf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes("[echo]\nprefix = 'é'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        loadConfig(str(path))


def test_missingFile(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        loadConfig(path)
    message = str(info.value)
    assert message == f"cannot read config file {path}: No such file or directory"


def test_directoryIsNotAFile(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Is a directory"):
        loadConfig(str(tmp_path))


# --listen


@pytest.mark.parametrize(
    "text, address, port",
    [
        ("[::]:7", "::", 7),
        ("0.0.0.0:12345", "0.0.0.0", 12345),
        ("127.0.0.2:0", "127.0.0.2", 0),
        ("[2001:db8::1]:65535", "2001:db8::1", 65535),
        ("[fe80::1%lo]:7", "fe80::1%lo", 7),
    ],
)
def test_parseListen(text: str, address: str, port: int) -> None:
    assert parseListen(text) == ListenConfig(address=address, port=port)


def test_parseListenSystemd() -> None:
    assert parseListen("systemd") == ListenConfig(systemd=True)
    assert parseListen("systemd:echo") == ListenConfig(systemd=True, fd_name="echo")


def test_parseListenTransparent() -> None:
    """
    C{,transparent} after a listener is C{transparent = true}.
    """
    assert parseListen("[::]:7000,transparent") == ListenConfig(
        address="::", port=7000, transparent=True
    )
    assert parseListen("systemd:dns,transparent") == ListenConfig(
        systemd=True, fd_name="dns", transparent=True
    )


@pytest.mark.parametrize(
    "text, cause",
    [
        ("::1:7", "IPv6 in brackets"),
        ("[::1]7", "IPv6 in brackets"),
        ("[127.0.0.1]:7", "IPv6 in brackets"),
        ("12345", "ADDRESS:PORT"),
        ("127.0.0.1:", "ADDRESS:PORT"),
        ("127.0.0.1:x", "ADDRESS:PORT"),
        ("localhost:7", "bad address 'localhost'"),
        ("127.0.0.1:65536", "port = 65536 is out of range"),
        ("[::]:7000,transparant", "the only option after a comma is transparent"),
        ("[::]:7000,", "the only option after a comma is transparent"),
    ],
)
def test_parseListenBad(text: str, cause: str) -> None:
    with pytest.raises(ConfigError) as info:
        parseListen(text)
    assert cause in str(info.value)
    assert "\n" not in str(info.value)


# Command line


def test_optionsDefault() -> None:
    options = parse([])
    assert options["udpdst"] == Config()
    assert options["sockets"] == [(ListenConfig(), None)]


def test_optionsOverrideTheFile(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[listen]]
address = "0.0.0.0"
port = 7
[echo]
prefix = "file"
[limits]
per_source_rate = 5
[log]
level = "warn"
stats_interval = 10
""",
    )
    options = parse(
        [
            "--config", path,
            "--listen", "127.0.0.2:7007",
            "--listen", "[::1]:7008",
            "--prefix", "cli> ",
            "--log-level", "debug",
            "--stats-interval", "2.5",
            "--reuse-port",
            "--workers", "auto",
            "--metrics", "127.0.0.1:9135",
        ]
    )  # fmt: skip
    config = options["udpdst"]
    assert config.listen == (
        ListenConfig("127.0.0.2", 7007, reuse_port=True),
        ListenConfig("::1", 7008, reuse_port=True),
    )
    assert config.echo.prefix == "cli> "
    assert config.log == LogConfig("debug", 2.5)
    assert config.service == ServiceConfig(workers="auto")
    assert config.metrics == MetricsConfig(listen="127.0.0.1:9135")
    # What the command line does not name comes from the file.
    assert config.limits.per_source_rate == 5


def test_optionsKeepTheFileWithoutOverrides(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[[listen]]\naddress = "0.0.0.0"\nport = 7\n[echo]\nprefix = "p"\n'
    )
    config = parse(["--config", path])["udpdst"]
    assert config.listen == (ListenConfig("0.0.0.0", 7),)
    assert config.echo.prefix == "p"


def test_emptyPrefixOverridesTheFile(tmp_path: Path) -> None:
    path = write(tmp_path, '[echo]\nprefix = "p"\n')
    assert parse(["--config", path, "--prefix", ""])["udpdst"].echo.prefix == ""


@pytest.mark.parametrize(
    "args, cause",
    [
        (["--listen", "nowhere"], "use ADDRESS:PORT"),
        (["--listen", "127.0.0.1:99999"], "out of range"),
        (["--log-level", "chatty"], "unknown log level"),
        (["--stats-interval", "soon"], "must be a number"),
        (["--stats-interval", "-1"], "out of range"),
        (["--prefix", "x" * 2000], "at most 1024"),
        (["--config", "/nonexistent/udpdst.toml"], "No such file or directory"),
        (["--listen", "systemd"], "none was passed"),
        (["--workers", "0"], "--workers = 0 is out of range"),
        (["--workers", "two"], 'must be an integer or "auto"'),
        (["--metrics", "9135"], "use ADDRESS:PORT"),
    ],
)
def test_optionsBad(args: list[str], cause: str) -> None:
    with pytest.raises(usage.UsageError) as info:
        parse(args)
    assert cause in str(info.value)
    assert "\n" not in str(info.value)


def test_optionsHelpIsTheSchemasDescription() -> None:
    """
    Each option that overrides a key is declared once, in the schema: its
    help text is the key's description.
    """
    help = str(Options())
    for table in TABLES.values():
        for f in dataclasses.fields(table):
            if f.metadata["option"]:
                line = f"--{f.metadata['option']}="
                assert line in help, line
                # usage.Options wraps help text: compare the words.
                words = f.metadata["doc"].split()
                assert " ".join(words[1:]) in " ".join(help.split()), f.name
    # --config is not a key: its help points at the example every install has.
    assert "(udpdst example-config prints a commented one)" in " ".join(help.split())
    assert {option.name for option in OPTIONS} == {
        "prefix",
        "log-level",
        "log-format",
        "stats-interval",
        "workers",
        "metrics",
    }


def test_underTwistdAnErrorIsOneLineAndAnExit() -> None:
    """
    Run by twistd (the options have a parent), a usage error exits with one
    line instead of twistd's full usage text.
    """
    options = Options(environ={})
    options.parent = usage.Options()
    with pytest.raises(SystemExit) as info:
        options.parseOptions(["--listen", "127.0.0.1:99999"])
    assert isinstance(info.value.code, str)
    assert info.value.code.startswith("twistd udpdst: --listen 127.0.0.1:99999: port")
    assert "\n" not in info.value.code

    options = Options(environ={})
    options.parent = usage.Options()
    with pytest.raises(SystemExit) as info:
        options.parseOptions(["--bogus"])
    assert info.value.code == (
        "twistd udpdst: option --bogus not recognized (see twistd udpdst --help)"
    )


def test_makeServiceOneChildPerListener() -> None:
    """
    makeService builds a listening service per listener, also for listeners
    that look alike (they are not told apart by name).
    """
    from udpdst.echo.tap import makeService

    options = parse(["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
    service = makeService(options)
    assert [child.listener for child in service.listeners] == [
        ListenConfig("127.0.0.1", 0),
        ListenConfig("127.0.0.1", 0),
    ]
    assert list(service) == service.listeners
