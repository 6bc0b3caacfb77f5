"""Quiet runs: everything a run's libraries print lands in flower.log, fedtl's own lines on the terminal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedtl.simulations.logs import flower_log_copy, quiet_output


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_quiet_output_sends_every_kind_of_output_to_the_log(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "flower.log"
    before = _open_fds()
    with quiet_output(log) as console:
        print("python print")
        sys.stderr.write("python stderr\n")
        os.write(1, b"fd one\n")
        os.write(2, b"fd two\n")
        logging.getLogger("flwr").warning("flower warning")
        subprocess.run(["echo", "child process"], check=True)  # inherits the descriptors, as Ray's processes do
        console.print("round table line")
    text = log.read_text()
    for line in ("python print", "python stderr", "fd one", "fd two", "flower warning", "child process"):
        assert line in text
    shown = capfd.readouterr()
    assert "round table line" in shown.out
    assert not any(line in shown.out + shown.err for line in ("python print", "fd one", "fd two", "flower warning",
                                                              "child process"))
    assert _open_fds() == before  # every descriptor it opened is closed again
    print("after")  # and stdout is back
    assert "after" in capfd.readouterr().out


def test_quiet_output_restores_everything_when_the_run_fails(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    before, out, err = _open_fds(), sys.stdout, sys.stderr
    with pytest.raises(RuntimeError, match="boom"), quiet_output(tmp_path / "flower.log"):
        raise RuntimeError("boom")
    assert sys.stdout is out and sys.stderr is err and _open_fds() == before
    with pytest.raises(FileNotFoundError):  # no folder for the log: nothing is left open
        with quiet_output(tmp_path / "missing" / "flower.log"):
            pass
    assert _open_fds() == before


def test_verbose_keeps_a_copy_of_flowers_log(tmp_path: Path) -> None:
    with flower_log_copy(tmp_path):
        logging.getLogger("flwr").warning("kept in the file too")
    assert "kept in the file too" in (tmp_path / "flower.log").read_text()
