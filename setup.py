"""
Builds the optional C extension udpdst._mmsg (batched recvmmsg/sendmmsg).

Everything else is in pyproject.toml.  Where no compiler exists, or the build
fails, the install still succeeds with one warning and udpdst runs its
pure-Python I/O path (see udpdst/io.py).
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """
    A C{build_ext} whose failure is a warning, not an error.
    """

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure is optional
            self._warn(e)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._warn(e)

    @staticmethod
    def _warn(e: Exception) -> None:
        print(
            f"WARNING: udpdst._mmsg not built ({e}); the pure-Python I/O path will run",
            file=sys.stderr,
        )


ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension("udpdst._mmsg", ["udpdst/_mmsg.c"], extra_compile_args=["-O2"])
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
