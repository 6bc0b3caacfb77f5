"""Quiet runs: Flower's and Ray's output goes to the run folder's ``flower.log``, fedtl's to the terminal.

A simulation prints from many places fedtl does not own: Flower's logger, Ray's driver
and its C++ processes, every Ray worker (forwarded to the driver's stdout), Python
warnings about Flower's internals (``run_simulation``'s deprecation, Ray's accelerator
tip). Rather than chase each, ``quiet_output`` points the process's own stdout and stderr
file descriptors at the log file for the length of the run (so child processes Ray starts
inherit it too), and hands back a console on a copy of the original terminal for fedtl's
round table and progress bar. Nothing is dropped: it is all in the log.

Written here because no library redirects a process's descriptors around a block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

from fedtl.reports.runs import LOG_FILE


@contextlib.contextmanager
def quiet_output(log_file: Path) -> Iterator[Console]:
    """Send everything written to file descriptors 1 and 2 to ``log_file``; yield a console on the terminal.

    Parameters
    ----------
    log_file : Path
        Appended to (its folder must exist): a run folder's ``flower.log``.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding=sys.stdout.encoding or "utf-8", errors="replace")
    with open(log_file, "ab", buffering=0) as log:
        try:
            for fd in saved:
                os.dup2(log.fileno(), fd)
            yield Console(file=terminal, force_terminal=terminal.isatty() or None, soft_wrap=True)
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(ValueError, OSError):
                    stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            terminal.close()


@contextlib.contextmanager
def flower_log_copy(run_dir: Path) -> Iterator[None]:
    """``--verbose``: Flower's log stays on the terminal and is also written to ``run_dir/flower.log``."""
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
