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
(imports, the pre-trained model, the mapped data store). It does so by handing Flower's
simulation engine a subclass of its own ``RayBackend`` whose ``build`` reuses the pool and whose
``terminate`` keeps it; the class is swapped in only inside ``kept_warm()``, and restored on exit,
when the actors are ended and Ray shut down. Flower has no option for this, hence the subclass.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fedtl.config import ExperimentConfig


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


# -- keeping the runtime warm ---------------------------------------------------------------------
_warm: dict[str, Any] = {}


def _warm_backend() -> type:
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    class WarmRayBackend(RayBackend):  # type: ignore[misc]
        """Flower's Ray backend, but the actor pool of the previous run is reused and kept at the end."""

        def build(self, app_fn: Any) -> None:
            pool = _warm.get("pool")
            if pool is not None and _warm.get("resources") == self.client_resources:
                self.pool, self.app_fn = pool, app_fn
                return
            _drop_pool()
            super().build(app_fn)
            _warm.update(pool=self.pool, resources=dict(self.client_resources))

        def terminate(self) -> None:
            pool = self.pool
            # Kept only if every actor is back, idle: a run that failed mid-round leaves its actors behind.
            if pool is not None and _warm.get("pool") is pool and len(pool.pool) == pool.num_actors:
                return
            _drop_pool()

    return WarmRayBackend


def _drop_pool() -> None:
    pool = _warm.pop("pool", None)
    _warm.pop("resources", None)
    if pool is not None:
        pool.terminate_all_actors()


@contextmanager
def kept_warm() -> Iterator[None]:
    """Run the simulations inside on one Ray instance and one pool of actors (see the module).

    Nested uses share the outer one. On exit the actors are ended and Ray is shut down.
    """
    if "backend" in _warm:
        yield
        return
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    raybackend.RayBackend = _warm_backend()
    _warm["backend"] = original
    try:
        yield
    finally:
        raybackend.RayBackend = original
        _warm.pop("backend", None)
        _drop_pool()
        import ray

        if ray.is_initialized():
            ray.shutdown()
