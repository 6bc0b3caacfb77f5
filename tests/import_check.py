"""What a fresh interpreter runs to import one module (kept apart from the tests: it imports nothing of fedtl)."""

from __future__ import annotations

import importlib
import traceback


def import_alone(module: str) -> str | None:
    """Import ``module``; ``None`` if it imports, else the last line of its traceback."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - the test reports whatever broke the import
        return traceback.format_exc().strip().splitlines()[-1]
    return None
