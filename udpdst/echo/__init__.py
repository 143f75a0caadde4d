"""
The C{twistd udpdst} echo service, built on the udpdst library (which never
imports it): the echo protocol and its limits, the configuration, the
listeners, the service with its stats, metrics, systemd and logs, worker
processes, and the twistd plugin's tap.

The names below load their modules on first use, as C{udpdst}'s do, so that
C{twistd udpdst --help} (which imports L{udpdst.echo.tap}) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from udpdst._lazy import lazyNames

if TYPE_CHECKING:
    from udpdst.echo._twistd import jsonLogObserver
    from udpdst.echo.config import Config, ConfigError, loadConfig
    from udpdst.echo.protocol import EchoProtocol
    from udpdst.echo.service import EchoService

_HOMES = {
    "Config": "udpdst.echo.config",
    "ConfigError": "udpdst.echo.config",
    "loadConfig": "udpdst.echo.config",
    "EchoProtocol": "udpdst.echo.protocol",
    "EchoService": "udpdst.echo.service",
    # For twistd --logger udpdst.echo.jsonLogObserver.
    "jsonLogObserver": "udpdst.echo._twistd",
}

__all__ = [
    "Config",
    "ConfigError",
    "EchoProtocol",
    "EchoService",
    "jsonLogObserver",
    "loadConfig",
]
assert sorted(__all__) == sorted(_HOMES)


__getattr__, __dir__ = lazyNames(globals(), _HOMES)
