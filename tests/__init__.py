"""
udpdst's tests: a pytest suite.
"""

import sys

if "twisted.scripts.trial" in sys.modules and "_pytest" not in sys.modules:
    # trial finds only the Twisted mixin TestCases here and would report a
    # green run of a fraction of the suite.
    raise SystemExit(
        "udpdst's tests are a pytest suite (trial would run only a fraction "
        "of them): run 'bash tests/run' or 'python -m pytest tests'"
    )
