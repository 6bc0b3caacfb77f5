"""The simulation runtime's resources, and start-up paid once for many runs.

**Resources.** ``simulation.num-cpus = 0`` (the default) gives each virtual client an equal share
of this machine's cores among the clients one round trains (at least one CPU): on 2 cores and 10
clients, 1 CPU each, two clients at a time; on 16 cores and 4 clients, 4 each. A simulated client
uses as many torch threads as CPUs (rounded, at least 1) unless ``simulation.threads`` says
otherwise. Both are written into the run's ``config.toml`` as resolved.

**Start-up paid once.** Flower 1.42's Ray backend ends every ``run_simulation`` by killing its
actors and calling ``ray.shutdown()``, so each run of a study (and a run's scratch baseline)
would start Ray again and new actor processes that import torch, Flower and fedtl, build the
model and map the data: ~20-25 s on a 2-core machine against ~0.25 s per round of the default
study. ``kept_warm()`` keeps one Ray instance and one pool of actors for all the runs inside it:
Flower still runs each run as it always does (its own run id, SuperNodes, node states, messages
and strategy), but the actors survive between runs, and with them what each process cached
(imports, the pre-trained model, the mapped data store). It does so through fedtl's
subclass of Flower's ``RayBackend`` (``backend.py``), whose ``build`` reuses the pool and whose
``terminate`` keeps it while ``kept_warm()`` is entered; on exit the actors are ended and Ray shut down.
A run that names another ``simulation.ray-address`` than the kept Ray's ends it and joins that one
(Flower would otherwise run it on whichever Ray is up).
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from fedtl.config import ExperimentConfig
from fedtl.errors import ConfigError
from fedtl.simulations.backend import WARM, release


def machine_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def clients_per_round(cfg: ExperimentConfig) -> int:
    """How many clients one round trains (Flower samples ``fraction-train`` of them, at least the minimum)."""
    s = cfg.strategy
    return max(1, min(cfg.clients, max(s.min_train_nodes, math.ceil(s.fraction_train * cfg.clients))))


def resolve_resources(cfg: ExperimentConfig, cores: int | None = None) -> ExperimentConfig:
    """``cfg`` with ``simulation.num-cpus`` and ``simulation.threads`` chosen where they are 0 (see the module).

    Parameters
    ----------
    cfg : ExperimentConfig
        The run.
    cores : int, optional
        The machine's cores (default: this process's); a Ray cluster (``simulation.ray-address``) without an
        explicit ``num-cpus`` gets 1 CPU per client.
    """
    sim = cfg.simulation
    num_cpus = sim.num_cpus
    if num_cpus == 0:
        if sim.ray_address:
            num_cpus = 1.0
        else:
            n = cores or machine_cores()
            num_cpus = float(max(1, n // min(clients_per_round(cfg), n)))
    threads = sim.threads or max(1, round(num_cpus))
    return dataclasses.replace(cfg, simulation=dataclasses.replace(sim, num_cpus=num_cpus, threads=threads))


def check_runtime(cfg: ExperimentConfig, cores: int | None = None, gpus: int | None = None) -> None:
    """Refuse, in seconds, resources the simulation could never get: Flower would wait for ever.

    On this machine a virtual client may not ask for more CPUs than it has (Ray places no actor and
    Flower waits for an empty pool) nor more GPUs than torch sees; a Ray cluster's head
    (``simulation.ray-address`` as ``host:port``) must accept a connection (``ray.init`` retries an
    unreachable one for minutes, deaf to SIGTERM).

    Raises
    ------
    ConfigError
        Naming the setting, what this machine has, and the fix.
    """
    sim = cfg.simulation
    if sim.ray_address:
        if sim.ray_address != "auto":
            _reachable(sim.ray_address)
        return
    n = cores or machine_cores()
    if sim.num_cpus > n:
        raise ConfigError(f"simulation.num-cpus = {sim.num_cpus:g} per client, but this machine has {n} cores: Ray "
                          f"could start no client. Set it to at most {n}, or 0 to share the cores among a round's clients")
    if sim.num_gpus > 0:
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if sim.num_gpus > gpus:
            raise ConfigError(f"simulation.num-gpus = {sim.num_gpus:g} per client, but this machine has {gpus} GPU(s) "
                              "visible: Ray could start no client. Lower it (fractions share a GPU), or set it to 0")


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"simulation.ray-address = {address!r} is not 'auto' or host:port (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"simulation.ray-address = {address!r}: no Ray cluster answers there ({err.strerror or err}). "
                          "Start one with `ray start --head` on that machine, or fix the address (empty: a "
                          "private Ray instance for this run)") from None


# -- keeping the runtime warm ---------------------------------------------------------------------
@contextmanager
def kept_warm() -> Iterator[None]:
    """Run the simulations inside on one Ray instance and one pool of actors (see the module).

    Nested uses share the outer one. On exit the actors are ended and Ray is shut down.
    """
    if WARM.get("on"):
        yield
        return
    WARM["on"] = True
    try:
        yield
    finally:
        WARM.pop("on", None)
        release()

