"""When the training loop ends, decided alike on every rank: ``train.max_steps``, a preemption
signal (SIGUSR2/SIGTERM: checkpoint and exit "preempted", so Slurm requeues), the time budget
(``train.max_minutes``, summed over resumes: "finished") or an early stop (``metrics.patience``,
which the evaluator reports)."""
from __future__ import annotations

import signal
import time

from gan.dist import any_rank


class StopRequest:
    """SIGUSR2/SIGTERM -> "checkpoint at the end of this step and exit". Install it as early as
    possible (launch/train.py does, before anything is built), so a signal that arrives during
    start-up is not lost; :class:`StopPolicy` reads ``reason``."""

    reason: str | None = None
    _previous: dict = {}  # signal -> the handler install() replaced

    @classmethod
    def install(cls) -> None:
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            previous = signal.signal(sig, cls._handler)
            if previous is not cls._handler:
                cls._previous[sig] = previous

    @classmethod
    def uninstall(cls) -> None:
        """Restore the handlers install() replaced: after training a plain SIGTERM ends the process."""
        for sig, previous in cls._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        cls._previous = {}

    @classmethod
    def _handler(cls, signum, _frame) -> None:
        cls.reason = signal.Signals(signum).name


class StopPolicy:
    """``should_stop(step)`` after every step; then ``outcome`` ("finished" or "preempted") and
    ``note`` say why. It also keeps ``state.train_seconds``, the loop's wall-clock summed over resumes."""

    def __init__(self, cfg, state, device, num_processes: int, rank0):
        self.cfg, self.state, self.device, self.rank0 = cfg, state, device, rank0
        # A single process reads its own flag every step for free; with several, the agreement is a
        # collective that waits for the GPU, so it runs every train.stop_check_every steps.
        self.every = cfg.train.stop_check_every if num_processes > 1 else 1
        self.budget = cfg.train.max_minutes * 60.0
        self.outcome, self.note = "finished", None

    def start(self) -> None:
        StopRequest.install()  # idempotent; launch/train.py installs it before building
        self._clock0, self._seconds0 = time.perf_counter(), self.state.train_seconds
        self.outcome, self.note = "finished", None
        if self._spent():  # from the checkpoint, so the same on every rank
            self._budget_note()

    def _spent(self) -> bool:
        return bool(self.budget) and self.state.train_seconds >= self.budget

    def _budget_note(self) -> None:
        self.note = f"time budget of {self.cfg.train.max_minutes:g} min (train.max_minutes) reached at step {self.state.step}"
        self.rank0.print(self.note)

    def early_stop(self, note: str | None) -> None:
        """The evaluator's verdict (the same on every rank): stop after this step, "finished"."""
        if note:
            self.note = note
            self.rank0.print(note)

    def tick(self) -> None:
        """After every training step: the training wall-clock."""
        self.state.train_seconds = self._seconds0 + time.perf_counter() - self._clock0

    def should_stop(self, step: int) -> bool:
        if self.note is not None or step >= self.cfg.train.max_steps:
            return True
        if step % self.every:
            return False
        # The ranks' clocks differ: they agree on the budget too. Collective, every rank.
        signalled, spent = any_rank([StopRequest.reason is not None, self._spent()], self.device)
        if spent:  # a spent budget ends the run anyway: "finished", no requeue
            self._budget_note()
        elif signalled:
            self.outcome = "preempted"
            self.rank0.print(f"stop requested ({StopRequest.reason or 'signal on another rank'}) at step {step}; "
                             f"checkpointing")
        return spent or signalled
