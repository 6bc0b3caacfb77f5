"""Where a process computes: the ``device`` setting, resolved against what the process sees.

Under Flower's Ray simulation a virtual client with ``simulation.num-gpus = 0`` sees no GPU
(Ray empties ``CUDA_VISIBLE_DEVICES`` for it), and one with a fractional share sees the GPU
it shares; ``"auto"`` therefore places each client where its resources say, and a machine
without CUDA runs everything on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedtl.config import ConfigError, catalogue
from fedtl.registry import Registry

DEVICES: Registry[Callable[[], torch.device]] = Registry("device", declared=catalogue.DEVICES)


@DEVICES.register("auto")
def _auto() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@DEVICES.register("cpu")
def _cpu() -> torch.device:
    return torch.device("cpu")


@DEVICES.register("cuda")
def _cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise ConfigError(
            "device = \"cuda\" but this process sees no CUDA GPU (torch.cuda.is_available() is False; under "
            "simulation, a client sees a GPU only with simulation.num-gpus > 0): set device = \"auto\" or \"cpu\"")
    return torch.device("cuda")


def resolve_device(setting: str) -> torch.device:
    """The device ``setting`` (``"auto"``, ``"cpu"`` or ``"cuda"``) names in this process.

    Raises
    ------
    ConfigError
        For ``"cuda"`` where no GPU is visible.
    RegistryError
        For an unknown setting.
    """
    return DEVICES.get(setting)()
