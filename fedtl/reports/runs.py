"""The files of run and study folders, and reading them back.

The server writes a run folder (``fedtl.server.record``), a study writes its plan
(``fedtl.simulations.study``); everything that reads them (reports, comparisons, a rerun
that skips finished runs) reads through here. Their names are ``fedtl.run_folder``'s.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# The names are the run folder's contract; the ones this module held before it are still importable from here.
from fedtl.run_folder import LEDGER_FILE as LEDGER_FILE
from fedtl.run_folder import LOG_FILE as LOG_FILE
from fedtl.run_folder import METRICS_FILE, SUMMARY_FILE
from fedtl.run_folder import NODE_STATE_DIR as NODE_STATE_DIR
from fedtl.run_folder import PLAN_FILE as PLAN_FILE
from fedtl.run_folder import RUN_FILES as RUN_FILES


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (nested in dicts, lists, tuples) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    """``value`` as strict JSON: Python's ``json`` writes NaN and Infinity, which JSON has not; they become null."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader (or a run killed meanwhile) sees the old file or the
    new one, never a part: a temporary file beside it, flushed to disk, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run (started or finished)."""
    return (Path(run_dir) / METRICS_FILE).exists() or (Path(run_dir) / SUMMARY_FILE).exists()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run folder's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
