"""The simulation runtime's default resources: the machine's cores shared among a round's clients."""

from __future__ import annotations

from fedtl.config import load_config
from fedtl.simulations.runtime import resolve_resources


def test_default_resources_share_the_machine_among_a_rounds_clients() -> None:
    def sim(cores: int, *sets: str) -> tuple[float, int]:
        s = resolve_resources(load_config(None, list(sets)), cores=cores).simulation
        return s.num_cpus, s.threads

    assert sim(2) == (1.0, 1)  # 10 clients, 2 cores: one core each, two at a time
    assert sim(16, "clients=4") == (4.0, 4)
    assert sim(16) == (1.0, 1)
    assert sim(16, "strategy.fraction-train=0.2") == (8.0, 8)  # 2 clients a round
    assert sim(16, "simulation.num-cpus=0.5", "simulation.threads=3") == (0.5, 3)  # what the config says is kept
    assert sim(16, "simulation.ray-address='auto'") == (1.0, 1)  # a cluster's cores are not this machine's
