"""Status lines on stderr for the long steps of a command: reading the tokenizer, compiling.

    with progress.status("compiling", enabled=show):
        ...                                   # stderr: "mtijax: compiling ..." then "mtijax: compiling: 12.3 s"

On a terminal the line shows the elapsed seconds while the step runs and is rewritten in place
when the step ends. Elsewhere (a log file, a pipe) it prints one line when the step starts and one
when it ends. A step that raises gets no closing line. With ``enabled=False`` it prints nothing.
The command line enables it when stderr is a terminal and ``--json`` is not given, or with
``--verbose`` (:func:`wanted`). Loading tensors has its own bar (tqdm, in
:func:`mtijax.weights.loader.load_params`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator, TextIO

TICK_SECONDS = 1.0
CLEAR_TO_END = "\x1b[K"


@contextlib.contextmanager
def status(what: str, enabled: bool = True, stream: TextIO | None = None) -> Iterator[None]:
    """Say ``what`` is happening while the block runs, then how long it took (see the module docstring).

    Args:
      what: a few words, e.g. ``"compiling"``.
      enabled: print nothing when False.
      stream: where to print (default ``sys.stderr``, looked up when the block starts).
    """
    if not enabled:
        yield
        return
    stream = sys.stderr if stream is None else stream
    live = stream.isatty()
    start = time.perf_counter()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(TICK_SECONDS):
            stream.write(f"\rmtijax: {what} ... {time.perf_counter() - start:.0f} s")
            stream.flush()

    stream.write(f"mtijax: {what} ..." if live else f"mtijax: {what} ...\n")
    stream.flush()
    ticker = threading.Thread(target=tick, daemon=True)
    if live:
        ticker.start()

    def stop() -> None:
        done.set()
        if live:
            ticker.join()

    try:
        yield
    except BaseException:
        stop()
        if live:  # end the status line, so an error message starts a line of its own
            stream.write("\n")
            stream.flush()
        raise
    stop()
    line = f"mtijax: {what}: {time.perf_counter() - start:.1f} s"
    stream.write(f"\r{line}{CLEAR_TO_END}\n" if live else f"{line}\n")
    stream.flush()


def wanted(json_output: bool = False, verbose: bool = False, stream: TextIO | None = None) -> bool:
    """Whether a command shows progress: with ``verbose``, or on a terminal unless it prints JSON."""
    stream = sys.stderr if stream is None else stream
    return verbose or (stream.isatty() and not json_output)
