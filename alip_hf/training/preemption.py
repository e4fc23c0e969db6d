"""Preemption: SIGTERM (how Slurm and Kubernetes stop a job before they kill it) and SIGUSR1 (what Slurm sends
ahead of the time limit with `sbatch --signal=USR1@<seconds>`) end the run cleanly.

The signal handler only records the signal. The loop asks `StopSignal.requested()` after each optimizer step;
every process answers the same (a sum over processes), so all ranks stop after the same step even when only one
of them received the signal. The run then saves a checkpoint of that step and exits with `PREEMPTED_EXIT_CODE`.

Exit status 75 is `EX_TEMPFAIL` of sysexits.h ("temporary failure; the user is invited to retry"). It is not
128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1), which the shell reports for a process the signal
killed: a job script or a Kubernetes `podFailurePolicy` (`onExitCodes`) can then tell "saved a checkpoint and
stopped, requeue me" from "died", and from an error (1).
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingPreempted(SystemExit):
    """Raised once the checkpoint of a preempted run is saved. A `SystemExit`: left uncaught, the process exits with
    `PREEMPTED_EXIT_CODE` and no traceback (the message is logged first); `except Exception` does not catch it."""

    def __init__(self, message: str, checkpoint):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return self.message


class StopSignal:
    """Context manager: while active, SIGTERM and SIGUSR1 are recorded instead of ending the process; the previous
    handlers come back on exit.

    Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread) the signals keep
    their default action and a warning says so.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGTERM and SIGUSR1 will end the run without a checkpoint")
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _record(self, signum, frame):
        # Only set a flag: the handler runs between two bytecodes of whatever the main thread is doing (a
        # collective, a checkpoint write), which must be left to finish.
        if self.received is None:
            self.received = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """Whether any process has received a stop signal; the same answer on every process (one all-reduce)."""
        local = self.received is not None
        if accelerator.num_processes == 1:
            return local
        flag = torch.tensor([float(local)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def ignore_stop_signals(worker_id: int):
    """`worker_init_fn` of the training DataLoaders: a signal sent to the whole process group (Slurm signals every
    process of a job step) must reach the training process only. torch's DataLoader workers otherwise die of a
    SIGTERM that their parent did not send, and the parent then fails on the lost worker instead of saving."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
