"""Stopping cleanly: a run checkpoints and exits on SIGUSR1 or SIGTERM (SLURM's warning before
a time limit, preemption), a sweep asks each of its runs to, and neither dies of a signal.

    with StopOnSignal() as stop:     # stop.requested: None, or the signal's name
        ...                          # train until stop.requested, checkpoint, exit PREEMPTED
    exit_with(main)                  # sys.exit(main()), the stop signals ignored from then on

Needs the standard library only: train.py installs its handler before NumPy is imported. A
sweep starts each run with SIGUSR1 blocked; StopOnSignal unblocks it once its handler is in.
"""
import signal
import sys

PREEMPTED = 75   # exit status after a checkpoint on SIGUSR1/SIGTERM (EX_TEMPFAIL); train.sh's too


class StopOnSignal:
    """SIGUSR1/SIGTERM (or `signals`) ask the run to stop at the end of the current compiled
    call (a context manager; `requested` names the signal once one came)."""
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, signals=SIGNALS):
        self.requested, self.signals = None, signals

    def handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        print(f"received {self.requested}: checkpointing at the end of the current call", flush=True)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.signals}
        # A sweep starts its runs with SIGUSR1 blocked (sweep.run_entries), so that one sent
        # before this handler existed waits instead of killing the run: delivered now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# What the sweep (sweep.py) stops on: SIGINT too, since its runs have their own process group
# and Ctrl-C reaches it alone; SIGHUP (the terminal closed), since they would lose their output.
SWEEP_SIGNALS = StopOnSignal.SIGNALS + (signal.SIGINT, signal.SIGHUP)


def exit_with(main, signals=StopOnSignal.SIGNALS):
    """sys.exit(main()), ignoring `signals` once main has returned (or raised): Python's
    shutdown restores their default action, and for SIGUSR1/SIGTERM that is death (status
    138/143), which would hide the status main decided; by then every file is written."""
    try:
        code = main()
    finally:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
    sys.exit(code)
