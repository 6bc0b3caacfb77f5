"""fedtl's errors: one hierarchy under ``FedtlError``, in a module light enough for the CLI to import at start.

Every error a user can fix, or a run reports, is a ``FedtlError``: its message names the
problem and the fix, and ``fedtl``'s commands print it without a traceback (the run folder
keeps what was already computed). Each class also derives from the built-in exception it
refines (``ValueError``, ``KeyError``, ...), so callers that catch those still do.

Raised deep inside (the data, the models, the strategy), caught by the commands, which
must not pay for importing torch and the data libraries just to name them.
"""

from __future__ import annotations


class FedtlError(Exception):
    """Base of every error fedtl reports to a user: the message says what is wrong and how to fix it."""


# -- configuration -------------------------------------------------------------------------
class ConfigError(FedtlError, ValueError):
    """A configuration that cannot be run; the message names the key and the fix."""


class RegistryError(FedtlError, KeyError):
    """An unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0])


class DataError(ConfigError):
    """Data that cannot be read as asked: a missing folder, an empty one, a corrupt image, a bad label."""


class PartitionError(FedtlError, ValueError):
    """A split that leaves some client without data; the message says how to fix it."""


class WeightsError(ConfigError):
    """Weights that cannot be loaded: missing, unreadable, or not this architecture's."""


class DPConfigError(ConfigError):
    """The model or plan cannot be trained with differential privacy as configured."""


class AccountantError(DPConfigError):
    """A privacy accountant that cannot state epsilon for these steps here (too little noise for its method)."""


class StudyError(ConfigError):
    """A study file or folder that cannot be run as asked."""


class RunFolderError(FedtlError, FileExistsError):
    """The run folder already holds a run."""


# -- a run that cannot go on -------------------------------------------------------------------
class RoundFailedError(FedtlError, RuntimeError):
    """No client update could be merged in a round."""


class RunStoppedError(FedtlError, RuntimeError):
    """Too few clients can still train (the others declined for good, e.g. their privacy budgets are spent)."""


class BackboneMismatchError(FedtlError, RuntimeError):
    """A client's pre-trained weights differ from the server's."""


class BudgetSpentError(FedtlError, RuntimeError):
    """Training this round would take the client past its privacy budget: it declines (not a failure).

    ``metrics`` holds the client's spend so far, for its reply.
    """

    def __init__(self, message: str, metrics: dict[str, float | int]) -> None:
        super().__init__(message)
        self.metrics = metrics
