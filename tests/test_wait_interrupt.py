"""A Ctrl-C that arrives while the main thread waits for the optimizer's jobs (a checkpoint's or
the final export's sync point) stops the run once the jobs have ended: it is not swallowed."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import Future

import pytest

from scheduler.unit_clock import wait_quietly


def test_an_interrupt_while_waiting_is_raised_after_the_jobs_end():
    job, failed = Future(), Future()
    failed.set_exception(RuntimeError("the job's own error: the worker reports it"))
    threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()  # the user's Ctrl-C
    threading.Timer(0.6, lambda: job.set_result([])).start()  # the job ends later
    with pytest.raises(KeyboardInterrupt):
        wait_quietly([job, failed])
    assert job.done()  # its buffers are no longer in use when the interrupt goes on


def test_job_errors_are_left_to_the_worker():
    failed = Future()
    failed.set_exception(OSError("a write failed"))
    wait_quietly([failed])
