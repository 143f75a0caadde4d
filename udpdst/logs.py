"""
The former home of C{jsonLogObserver}, for C{twistd --logger
udpdst.logs.jsonLogObserver}: kept for one release.  It is part of the
service, not of the library; use C{udpdst.echo.jsonLogObserver}.
"""

from __future__ import annotations

from typing import Any


def jsonLogObserver() -> Any:
    """
    L{udpdst.echo._twistd.jsonLogObserver}, under its former name.
    """
    from udpdst.echo._twistd import jsonLogObserver as observer

    return observer()
