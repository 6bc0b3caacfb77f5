"""Digits split, scenarios, styles, partitioning and each client's data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtl.config import DataConfig
from fedtl.data.digits import digits_images, source_target_indices
from fedtl.data.federated import client_data, server_test_data
from fedtl.data.partition import PartitionError, partition_indices
from fedtl.data.scenarios import DIGIT_STYLES, load_scenario
from fedtl.data.styles import STYLES, apply_style


def test_source_and_target_are_disjoint_halves_of_all_digits() -> None:
    source, target = source_target_indices()
    assert len(source) + len(target) == 1797
    assert set(source).isdisjoint(target)
    x, y = digits_images(16)
    assert x.shape == (1797, 1, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # stratified: every class is in both halves in near-equal numbers
    counts = np.bincount(y.numpy()[source], minlength=10) - np.bincount(y.numpy()[target], minlength=10)
    assert np.abs(counts).max() <= 1


def test_domain_shift_scenario_pools_and_test_split() -> None:
    sc = load_scenario(DataConfig(test_fraction=0.3))
    assert sc.num_classes == 10 and sc.styles == DIGIT_STYLES
    assert len(sc.pool_y) + len(sc.test_y) == len(source_target_indices()[1])
    assert len(sc.test_y) == pytest.approx(0.3 * len(source_target_indices()[1]), abs=1)


def test_split_class_scenario_separates_classes() -> None:
    sc = load_scenario(DataConfig(scenario="digits-split-class"))
    assert set(sc.source_y.tolist()) == {0, 1, 2, 3, 4}
    assert set(sc.pool_y.tolist()) == {0, 1, 2, 3, 4}  # digits 5-9, relabelled
    assert sc.num_classes == 5 and sc.styles == ("clean",)


@pytest.mark.parametrize("style", [s for s in STYLES.names() if s != "clean"])
def test_styles_change_images_deterministically_and_stay_in_range(style: str) -> None:
    x = digits_images(16)[0][:8]
    a, b = apply_style(style, x, seed=3), apply_style(style, x, seed=3)
    assert torch.equal(a, b)
    assert not torch.allclose(a, x, atol=1e-3)
    assert a.shape == x.shape and float(a.min()) >= -1e-6 and float(a.max()) <= 1 + 1e-6


def test_iid_partition_is_disjoint_and_balanced() -> None:
    labels = np.arange(100) % 10
    parts = partition_indices(labels, 4, partitioner="iid", alpha=1.0, min_size=1, seed=0)
    assert [len(p) for p in parts] == [25, 25, 25, 25]
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))


def test_dirichlet_partition_is_skewed_and_seeded() -> None:
    labels = np.arange(600) % 10
    a = partition_indices(labels, 5, partitioner="dirichlet", alpha=0.1, min_size=5, seed=1)
    b = partition_indices(labels, 5, partitioner="dirichlet", alpha=0.1, min_size=5, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(600))
    dominant = [np.bincount(labels[p], minlength=10).max() / len(p) for p in a]
    assert max(dominant) > 0.4  # strong label skew at alpha=0.1 (IID would be ~0.1)


def test_impossible_partition_names_seed_alpha_and_fix() -> None:
    labels = np.arange(40) % 10
    # flwr-datasets warns at each of its ten resampling tries, then gives up; we name the fix.
    with pytest.warns(UserWarning, match="min_partition_size"), \
            pytest.raises(PartitionError, match=r"alpha=0.05, seed=3.*Fix: raise data.alpha"):
        partition_indices(labels, 8, partitioner="dirichlet", alpha=0.05, min_size=5, seed=3)
    with pytest.raises(PartitionError, match=r"50 clients but only 40 labelled images"):
        partition_indices(labels, 50, partitioner="iid", alpha=1.0, min_size=1, seed=0)


def test_each_client_holds_few_images_in_its_own_style() -> None:
    cfg = DataConfig(labelled_per_client=12)
    clients = [client_data(cfg, i, 10, seed=0) for i in range(10)]
    assert all(len(c) == 12 for c in clients)
    assert [c.style[0] for c in clients] == [DIGIT_STYLES[i % 5] for i in range(10)]
    again = client_data(cfg, 3, 10, seed=0)
    assert torch.equal(again.x, clients[3].x) and torch.equal(again.y, clients[3].y)
    assert not torch.equal(client_data(cfg, 3, 10, seed=1).y, clients[3].y)
    with pytest.raises(ValueError, match="partition-id 10 is outside"):
        client_data(cfg, 10, 10, seed=0)


def test_server_test_set_covers_every_style() -> None:
    t = server_test_data(DataConfig())
    assert set(t.style) == set(DIGIT_STYLES)
    assert len(t) == len(load_scenario(DataConfig()).test_y)


@pytest.mark.parametrize(("items", "clients"), [(10, 3), (100, 7), (1000, 1000), (1001, 10)])
def test_the_iid_split_is_flower_datasets_own_cut_in_one_pass(items: int, clients: int) -> None:
    # fedtl cuts IidPartitioner's contiguous shards with numpy (its own call costs ~1.4 ms a client).
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    labels = np.arange(items) % 10
    ours = partition_indices(labels, clients, partitioner="iid", alpha=0.5, min_size=1, seed=3)
    rows = np.random.default_rng(3).permutation(items)
    flower = IidPartitioner(num_partitions=clients)
    flower.dataset = Dataset.from_dict({"index": rows.tolist(), "label": labels[rows].tolist()})
    assert len(ours) == clients
    for i in range(clients):
        np.testing.assert_array_equal(ours[i], flower.load_partition(i)["index"])
