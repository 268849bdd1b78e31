"""SIGINT/SIGTERM: the first asks for a stop after the step, the second stops at once; handlers are restored."""

import os
import signal

import pytest

from lorakit.errors import EXIT_INTERRUPTED, Interrupted
from lorakit.interrupt import GracefulStop


def test_first_signal_requests_a_stop_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop("lorakit train r.yaml --resume") as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        error = stop.stopped(12, "runs/x/checkpoints/step-000012")
        assert error.exit_code == EXIT_INTERRUPTED
        assert str(error) == ("SIGTERM: stopped after step 12, checkpoint runs/x/checkpoints/step-000012; "
                              "resume with: lorakit train r.yaml --resume")
        with pytest.raises(Interrupted, match="SIGINT again: stopped at once.*lorakit train r.yaml --resume"):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
