"""Quiet runs: Flower's and Ray's output goes to the run folder's ``flower.log``, fedtl's to the terminal.

A simulation prints from many places fedtl does not own: Flower's logger, Ray's driver
and its C++ processes, every Ray worker (forwarded to the driver's stdout), Python
warnings about Flower's internals (``run_simulation``'s deprecation, Ray's accelerator
tip). Rather than chase each, ``quiet_output`` points the process's stdout and stderr at
the log for the length of the run: the file descriptors 1 and 2 (so child processes Ray
starts inherit it too), Python's ``sys.stdout`` and ``sys.stderr`` (which need not be those
descriptors: under pytest or a notebook they are not), and Flower's log handlers (which
keep the stream they were made with). It hands back a console on the terminal for fedtl's
round table and progress bar. Nothing is dropped: it is all in the log.

Written here because no library redirects a process's descriptors around a block.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from rich.console import Console

from fedtl.run_folder import LOG_FILE


def _on_fd_1(stream: TextIO) -> bool:
    try:
        return stream.fileno() == 1
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False


@contextlib.contextmanager
def quiet_output(log_file: Path) -> Iterator[Console]:
    """Send everything written to stdout and stderr to ``log_file``; yield a console on the terminal.

    Parameters
    ----------
    log_file : Path
        Appended to (its folder must exist): a run folder's ``flower.log``.
    """
    out, err = sys.stdout, sys.stderr
    with contextlib.ExitStack() as stack:
        # First: nothing to undo if it fails. One handle, appended to both through Python and through fds 1 and 2.
        text = stack.enter_context(open(log_file, "a", buffering=1, encoding="utf-8", errors="replace"))
        if _on_fd_1(out):  # a copy of the real terminal, which fd 1 is about to stop being
            terminal: TextIO = stack.enter_context(os.fdopen(os.dup(1), "w", buffering=1,
                                                             encoding=out.encoding or "utf-8", errors="replace"))
        else:  # Python's stdout is not fd 1 (pytest's capture, a notebook): fedtl's lines go where it goes
            terminal = out
        for stream in (out, err):
            with contextlib.suppress(ValueError, OSError):
                stream.flush()
        for fd in (1, 2):
            saved = os.dup(fd)
            stack.callback(os.close, saved)
            stack.callback(os.dup2, saved, fd)
            os.dup2(text.fileno(), fd)
        # Flower's console handlers, whatever stream they were made with (the one at flwr's import).
        handlers = [h for h in logging.getLogger("flwr").handlers
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        for h in handlers:
            stack.callback(h.setStream, h.setStream(text))
        stack.callback(setattr, sys, "stdout", out)
        stack.callback(setattr, sys, "stderr", err)
        sys.stdout = sys.stderr = text
        stack.callback(text.flush)
        yield Console(file=terminal, force_terminal=terminal.isatty() or None, soft_wrap=True)


@contextlib.contextmanager
def flower_log_copy(run_dir: Path) -> Iterator[None]:
    """``--verbose``: Flower's log stays on the terminal and is also written to ``run_dir/flower.log``
    (Flower's lines only: Ray's go to the terminal alone)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s: %(message)s"))
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
