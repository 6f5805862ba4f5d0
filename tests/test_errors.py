"""Which signals stop a command, and SIGTERM turned into Terminated where predict and export are."""

from __future__ import annotations

import os
import signal

import pytest

from trainer.errors import Terminated, output_in_place, stop_signals, terminated_raises


@pytest.fixture
def hangup_restored():
    previous = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, previous)


def test_a_closed_terminal_stops_a_command_unless_nohup_ignores_it(hangup_restored):
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    assert stop_signals() == (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts a command
    assert stop_signals() == (signal.SIGINT, signal.SIGTERM)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_raises_terminated_as_sigterm_once_and_the_handlers_come_back(hangup_restored, signum):
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    cleaned = False
    with pytest.raises(Terminated) as stopped, terminated_raises():
        try:
            os.kill(os.getpid(), signum)
            pytest.fail("the signal did not stop the command")
        finally:  # the cleanup: the second signal a closed terminal often sends must not cut it short
            os.kill(os.getpid(), signum)
            cleaned = True
    assert cleaned and stopped.value.signum == signal.SIGTERM and str(stopped.value) == "SIGTERM"
    assert {s: signal.getsignal(s) for s in before} == before


def test_once_the_output_is_being_put_in_place_a_signal_is_ignored(hangup_restored):
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    output_in_place()  # outside terminated_raises: nothing changes
    assert {s: signal.getsignal(s) for s in before} == before
    with terminated_raises():
        output_in_place()
        for signum in before:  # ignored, Ctrl-C too: the command finishes
            os.kill(os.getpid(), signum)
    assert {s: signal.getsignal(s) for s in before} == before
