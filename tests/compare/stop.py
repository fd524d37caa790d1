"""A callback for the compare tests: where FTLAB_TEST_KILL_AT_TEST is set, the fit's process is killed as its
test loop starts, after training ended and its summary was written (a node lost, a Ctrl-C, at that moment)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtTest(L.Callback):
    def on_test_start(self, trainer, pl_module) -> None:
        if os.environ.get("FTLAB_TEST_KILL_AT_TEST"):
            os.kill(os.getpid(), signal.SIGKILL)
