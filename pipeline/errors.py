"""The exceptions the CLI turns into one line and an exit code: a user error (exit 2), an interrupted run (130, 143
or 75), SIGTERM taken as Ctrl-C; and `first_line`, the one way an exception's text is put on one line."""

import contextlib
import signal
import threading


class UserError(Exception):
    """A problem with the user's input (path, file, option), not a bug: reported without a traceback."""


class Interrupted(Exception):
    """A run stopped before its end, its work saved; the message says what is saved and how to resume. The CLI
    exits with `exit_code`: 130 for Ctrl-C (SIGINT), 143 for SIGTERM (a scheduler, `docker stop`, torchrun stopping
    a job's other ranks), 75 when a decode worker died (the OOM killer, kill -9): a temporary failure, rerun."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be (extract turns both into an `Interrupted`)."""


EXIT_CTRL_C, EXIT_SIGTERM, EXIT_WORKER_DIED = 130, 143, 75


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """Inside: SIGTERM (what schedulers and `docker stop` send, and torchrun a job's other ranks when one fails)
    raises `Terminated` where Ctrl-C raises KeyboardInterrupt, so that a command stops as it does on Ctrl-C (saying
    what is saved) and exits 143. Only the main thread can take signals: elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interruption_in(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM) that `e` is or wraps: Python turns a KeyboardInterrupt raised while a class is being
    made (`__set_name__`, as a lazy import of scikit-learn or torch defines its classes) into a RuntimeError."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, KeyboardInterrupt):
            return e
        e, seen = (e.__cause__ if isinstance(e, RuntimeError) else None), seen + 1
    return None


def forget_interrupted_string_evals() -> None:
    """Let the exit code stand after a Ctrl-C that was handled. CPython (3.11 to 3.13) remembers a KeyboardInterrupt
    that ended code run from a string (`exec("...")`: dataclasses and namedtuple build their methods that way while
    a lazy import runs) even when a caller caught it, and under `python -m` it then ends the process by SIGINT
    after the exit code is set (-2 for the parent, not 130). Every string eval clears that flag first: this one."""
    exec("None")


def first_line(e: BaseException, empty: str | None = None) -> str:
    """An exception's text on one line, for a one-line message: its first line, or `empty` (default: its type's
    name) when it has no text."""
    text = str(e).strip()
    return text.splitlines()[0] if text else (empty if empty is not None else type(e).__name__)
