"""Nothing left running when a simulation's process ends, however it ends.

Ray's processes outlive the process that started them when it is killed (SIGKILL, an OOM kill):
its dashboard and runtime-env agents stay up, orphaned, for ever. A signal handler cannot help
with SIGKILL, and a process group cannot either (``fedtl`` shares its terminal's group, so that
Ctrl-C reaches it). So ``watch_descendants()`` starts a small watcher process, once per process:
it notes the process's descendants every second, and when the process is gone (its end of a pipe
closes) it ends the ones it noted that still run. It runs in its own session, so a Ctrl-C meant
for ``fedtl`` does not stop it. No library does this (Ray's own fate sharing covers the raylet and
GCS, not their agents), hence this module; psutil does the process bookkeeping.

Run as ``python -m fedtl.simulations.reaper <pid>`` by ``watch_descendants``; not a user command.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

_started: dict[int, subprocess.Popen] = {}  # this process's pid -> its watcher


def watch_descendants() -> None:
    """Start this process's watcher (see the module), unless it runs already."""
    if os.getpid() in _started:
        return
    _started[os.getpid()] = subprocess.Popen(
        [sys.executable, "-m", "fedtl.simulations.reaper", str(os.getpid())], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _watch(pid: int, every_s: float = 1.0, grace_s: float = 3.0) -> None:
    import psutil

    try:
        watched = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, psutil.Process] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], every_s)
        if ready and not sys.stdin.buffer.read1(1):  # EOF: the watched process has ended
            break
        try:
            seen.update({p.pid: p for p in watched.children(recursive=True)})
        except psutil.NoSuchProcess:
            break
    # psutil.Process compares creation times too: a pid reused since it was seen is not touched.
    left = [p for p in seen.values() if p.pid != os.getpid() and p.is_running()]
    for p in left:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch(int(sys.argv[1]))
