"""Errors a user can fix or a run reports, in a module light enough for the CLI to import at start.

They are raised deep inside (partitioning, the strategy) but caught by ``fedtl``'s commands,
which must not pay for importing torch and the data libraries just to name them.
"""

from __future__ import annotations


class PartitionError(ValueError):
    """A split that leaves some client without data; the message says how to fix it."""


class RoundFailedError(RuntimeError):
    """No client update could be merged in a round."""


class RunStoppedError(RuntimeError):
    """Too few clients can still train (the others declined for good, e.g. their privacy budgets are spent)."""
