"""Long work made visible and stoppable: progress bars that stay readable in a redirected log, and Ctrl-C
that says what was saved."""

import contextlib
import sys

from tqdm import tqdm

# A bar redraws at most this often: on a terminal, and in a redirected log, where each redraw is one record.
TERMINAL_REDRAW_S = 0.5
LOG_REDRAW_S = 60.0


class _LogLines:
    """tqdm's output stream outside a terminal: each redraw becomes one line, not a '\\r'-overwritten stretch
    of a single line, so `tail`, `grep` and editors show the log as written."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar on stderr that stays readable in a redirected log: there it writes a line a minute, not a
    redraw per update."""
    if sys.stderr.isatty():
        return tqdm(iterable, file=sys.stderr, mininterval=TERMINAL_REDRAW_S, **kwargs)
    return tqdm(iterable, file=_LogLines(sys.stderr), mininterval=LOG_REDRAW_S, **kwargs)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying a line that says what was saved and how to resume."""


@contextlib.contextmanager
def on_interrupt(describe):
    """Turn Ctrl-C inside into Interrupted(describe()), so the CLI can say what was saved instead of a traceback."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(describe()) from None
