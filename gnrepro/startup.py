"""Library start-up chatter off, for every command of the repository: the scripts that start
a Keras backend (train.py, reproduce.py, bench.py) import it through here.

    from gnrepro import startup
    with startup.quiet():
        import keras

On a CPU machine TensorFlow starts with lines that read like failures and are none:
`E0000 ... failed call to cuInit: ... UNKNOWN ERROR (303)` (no GPU), `I0000 ... oneDNN custom
operations are on`, `I0000 ... Could not find cuda drivers`, each after `WARNING: All log
messages before absl::InitializeLog() is called are written to STDERR`. The first is TF's
own C++ logging, which TF_CPP_MIN_LOG_LEVEL=3 turns off (2 keeps errors, and this line is
one); the others are printed through absl before TensorFlow sets absl up, which no variable
reaches, so quiet() drops those lines (absl's I and W lines, and its WARNING line) from the
process's stderr while the library is imported. Both only where the user has not set
TF_CPP_MIN_LOG_LEVEL: their own value wins, and with it every line comes through. JAX and
PyTorch print nothing at start-up on a CPU. Python's own warnings and errors always pass.

Later, one line of TensorFlow's Python logger: `WARNING:tensorflow:5 out of the last 5 calls to
<function TensorFlowTrainer.make_predict_function.<locals>.one_step_on_data_distributed ...>
triggered tf.function retracing`. Keras compiles one predict function per model, all of the
same Python code, and TensorFlow counts their first traces together (5 of its last 10 calls,
at most twice), so a process that evaluates five models or more (reproduce.py) is told it
retraces too often. Each model is traced once, as it must be (its own weights), and Keras
already asks for reduce_retracing: no_retracing_warning() drops that message alone.
"""
import contextlib
import logging
import os
import re
import sys
import threading

DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "3"}   # TensorFlow's and XLA's C++ logs: none below FATAL
# absl's lines before absl::InitializeLog(): the announcement, then I (info) and W (warning)
# lines such as `I0000 00:00:1796161653.199293    3008 port.cc:153] oneDNN ...`.
CHATTER = re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\)|"
                     rb"[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w./-]+:\d+\] ")
# Where quiet() set a default, this says so (GNREPRO_DEFAULT_TF_CPP_MIN_LOG_LEVEL=3): the
# processes a sweep starts inherit both, and must not take our default for the user's choice.
MARK = "GNREPRO_DEFAULT_"


def users_setting(key, environ=os.environ):
    """Whether the user set `key` (not quiet() in this process or in a parent process)."""
    return key in environ and environ[key] != environ.get(MARK + key)


def _relay(read_fd, write_fd):
    """Copy lines from read_fd to write_fd until EOF, dropping CHATTER."""
    with os.fdopen(read_fd, "rb") as lines:
        for line in lines:
            if not CHATTER.match(line):
                os.write(write_fd, line)


@contextlib.contextmanager
def quiet():
    """Within the block, absl's start-up lines are dropped from stderr (file descriptor 2,
    where C++ writes); everything else written there passes; TF_CPP_MIN_LOG_LEVEL is set to
    DEFAULTS' for this process and its children. A no-op where the user set
    TF_CPP_MIN_LOG_LEVEL, or TensorFlow has started already. Importing this module changes
    nothing: only quiet() does."""
    if users_setting("TF_CPP_MIN_LOG_LEVEL") or "tensorflow" in sys.modules:
        yield
        return
    for key, value in DEFAULTS.items():   # for this process and those it starts
        os.environ[key] = os.environ[MARK + key] = value
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    relay = threading.Thread(target=_relay, args=(read_fd, saved), daemon=True)
    relay.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)   # the pipe's last writer is gone: the relay reads to EOF and ends
        relay.join()
        os.close(saved)


RETRACING = "triggered tf.function retracing"   # TensorFlow's warning, see the top


def _not_retracing(record):
    return RETRACING not in record.getMessage()


def no_retracing_warning():
    """Drop TensorFlow's retracing warning (RETRACING) from its Python logger; its other
    messages pass. For a process that evaluates one model after another. Idempotent."""
    logging.getLogger("tensorflow").addFilter(_not_retracing)
