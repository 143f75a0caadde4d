"""
Run Twisted's own test modules under one reactor, as C{trial --reactor NAME}
does, and write what happened to a JSON file: each test's outcome, and how
many UDP ports of each class were started.

    python -m tests._twisted_suites REACTOR RESULT.json WORKDIR MODULE...

REACTOR is a name C{trial --reactor} takes (C{epoll}, C{udpdst}, ...): it is
installed with L{twisted.application.reactors.installReactor}, as trial's
C{--reactor} option does, so a udpdst reactor is patched by its plugin.  The
result file holds C{{"reactor": class name, "ioPath": ..., "ports":
{class name: count}, "outcomes": {test id: outcome}}}, with outcomes
C{"success"}, C{"failure"}, C{"error"}, C{"skip"}, C{"expectedFailure"},
C{"unexpectedSuccess"}.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

#: What a test's outcome is called, by the reporter method that reports it.
OUTCOMES = {
    "addSuccess": "success",
    "addFailure": "failure",
    "addError": "error",
    "addSkip": "skip",
    "addExpectedFailure": "expectedFailure",
    "addUnexpectedSuccess": "unexpectedSuccess",
}


def countPorts() -> Counter[str]:
    """
    Count every UDP port started from now on (Twisted's and udpdst's, which
    subclass it), by class name; a port whose bind failed is not counted.
    """
    from twisted.internet import udp

    started: Counter[str] = Counter()
    startListening = udp.Port.startListening

    def counted(self: Any) -> None:
        startListening(self)
        started[type(self).__name__] += 1

    udp.Port.startListening = counted  # type: ignore[method-assign]
    return started


def recordingReporter(outcomes: dict[str, str]) -> Any:
    """
    A trial reporter class that also records each test's outcome by id in
    C{outcomes}; a test reported twice (an error in its clean-up after it
    passed) keeps the worse outcome.
    """
    from twisted.trial.reporter import TreeReporter

    worse = ("success", "skip", "expectedFailure", "unexpectedSuccess")

    def recorder(method: str) -> Any:
        outcome = OUTCOMES[method]
        base = getattr(TreeReporter, method)

        def record(self: Any, test: Any, *args: Any) -> None:
            testId = test.id()
            if outcomes.get(testId) in (None, *worse):
                outcomes[testId] = outcome
            base(self, test, *args)

        return record

    return type(
        "RecordingReporter",
        (TreeReporter,),
        {method: recorder(method) for method in OUTCOMES},
    )


def main(reactorName: str, resultPath: str, workDir: str, *modules: str) -> int:
    from twisted.application.reactors import installReactor

    installReactor(reactorName)
    from twisted.internet import reactor
    from twisted.trial.runner import TestLoader, TrialRunner

    from udpdst.port import IO_PATH

    started = countPorts()
    outcomes: dict[str, str] = {}
    suite = TestLoader().loadByNames(list(modules), recurse=True)
    runner = TrialRunner(
        recordingReporter(outcomes), workingDirectory=workDir, stream=sys.stdout
    )
    result = runner.run(suite)
    Path(resultPath).write_text(
        json.dumps(
            {
                "reactor": type(reactor).__name__,
                "ioPath": IO_PATH,
                "ports": dict(started),
                "outcomes": outcomes,
            },
            indent=1,
        )
    )
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
