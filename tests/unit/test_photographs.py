"""The photographs scenarios: real photographs from scikit-image's wheel, through the data store like any source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtl.config import ConfigError, DataConfig
from fedtl.data import photographs
from fedtl.data.federated import client_data, server_test_data
from fedtl.data.scenarios import load_scenario


def test_texture_patches_are_real_distinct_patches_of_ten_photographs_the_same_every_time() -> None:
    x, y = photographs.texture_patches(32)
    assert x.shape == (1200, 1, 32, 32) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [120] * 10
    assert torch.equal(x, photographs.texture_patches(32)[0])  # seeded: every machine cuts the same patches
    per_class = x.float().view(10, 120, -1)
    assert (per_class.std(dim=2) > 1).all()  # no blank patch
    assert len({tuple(p.tolist()) for p in x.view(1200, -1)}) == 1200  # no patch twice
    means = per_class.mean(dim=(1, 2))  # ten different photographs: their mean grey levels differ
    assert means.max() - means.min() > 20


@pytest.mark.parametrize(("name", "classes", "total"), [("photo-textures", 10, 1200), ("lfw-faces", 2, 200)])
def test_a_photographs_scenario_goes_through_the_store_with_the_digits_as_its_source(
        name: str, classes: int, total: int, tmp_path: Path) -> None:
    cfg = DataConfig(scenario=name, image_size=24, store_dir=str(tmp_path), partitioner="dirichlet", alpha=0.5,
                     domain_skew=True)
    sc = load_scenario(cfg)
    assert (sc.num_classes, sc.in_channels, sc.source_classes) == (classes, 1, 10)
    assert len(sc.pool_y) + len(sc.test_y) == total
    assert len(sc.test_y) == round(total * cfg.test_fraction)
    assert set(sc.test_y.tolist()) == set(range(classes))  # stratified: every class is tested
    assert sc.source_x.shape[1:] == (1, 24, 24) and len(sc.source_y) == 898
    assert any(tmp_path.iterdir())  # decoded once into the store, mapped from there
    data = client_data(cfg, 0, 5, seed=0)
    assert 0 < len(data) <= cfg.labelled_per_client and data.x.shape[1:] == (1, 24, 24)
    assert 0.0 <= float(data.x.min()) and float(data.x.max()) <= 1.0
    assert len(server_test_data(cfg)) == len(sc.test_y)


def test_lfw_labels_follow_scikit_images_order_faces_first() -> None:
    from skimage.data import lfw_subset

    faces = torch.from_numpy(lfw_subset()[:100].astype("float32"))
    sc = photographs.lfw_faces(DataConfig(scenario="lfw-faces", image_size=25))
    x = torch.cat([sc.pool_x, sc.test_x]).float().squeeze(1) / 255
    y = torch.cat([sc.pool_y, sc.test_y])
    is_face = [bool(((faces - img).abs().amax(dim=(1, 2)) < 1 / 255 + 1e-6).any()) for img in x]
    assert is_face == [bool(v) for v in (y == 1).tolist()]


def test_without_scikit_image_the_error_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'fedtl\[photos\]'"):
        photographs.texture_patches(16)
