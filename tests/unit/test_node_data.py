"""A deployed node's own data (node config ``data-path``), the ``nodes`` scenario, and the dry-run export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedtl.clients.app import handle_evaluate, handle_train
from fedtl.clients.node_data import node_data
from fedtl.config import ConfigError, DataConfig
from fedtl.data.export import export_partitions, save_images
from fedtl.data.federated import client_data, client_test_data, server_test_data, task
from fedtl.data.node_files import Task, read_node_data
from fedtl.devices import resolve_device
from fedtl.errors import DataError
from fedtl.models.factory import build_model
from fedtl.models.modes import plan_round
from tests.helpers import make_config


def _instruction(cfg, rnd: int = 1) -> Message:
    model = build_model(cfg)
    plan = plan_round(cfg.finetune, model.block_names, rnd)
    plan.apply_to(model)
    config = ConfigRecord({**plan.to_config(), "backbone-fingerprint": model.backbone_fingerprint, "server-round": rnd})
    return Message(RecordDict({"arrays": ArrayRecord(model.travelling_state()), "config": config}), dst_node_id=7,
                   message_type="train")


def _node(config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def _folder(root: Path, counts: dict[str, int], channels: int = 1, size: int = 8) -> Path:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(sum(counts.values()), channels, size, size, generator=g)
    y = torch.tensor([i for i, n in enumerate(counts.values()) for _ in range(n)])
    save_images(x, y, root, list(counts))
    return root


def test_a_folder_is_labelled_by_data_classes_and_split_into_train_and_its_own_test(tmp_path: Path) -> None:
    # Only two of the run's three classes are on this node: data.classes keeps the labels aligned.
    _folder(tmp_path / "n", {"cat": 6, "dog": 4})
    cfg = DataConfig(classes="ant,cat,dog", image_size=8, client_test_fraction=0.2, labelled_per_client=0)
    images = read_node_data(str(tmp_path / "n"), cfg, Task(3, 1))
    (x, y), ty = (images.train.x, images.train.y), images.test.y
    assert x.shape == (8, 1, 8, 8) and len(ty) == 2  # int(10 * 0.2) held out as its own test set
    assert sorted(torch.cat([y, ty]).tolist()) == [1] * 6 + [2] * 4  # cat = 1, dog = 2 of ant,cat,dog
    assert sorted(ty.tolist()) == [1, 2]  # stratified


def test_a_folder_without_data_classes_must_hold_every_class(tmp_path: Path) -> None:
    _folder(tmp_path / "n", {"cat": 3, "dog": 3})
    with pytest.raises(DataError, match=r"2 class folders \(cat, dog\) but the model has 3 classes: name them all"):
        read_node_data(str(tmp_path / "n"), DataConfig(image_size=8), Task(3, 1))
    with pytest.raises(DataError, match=r"classes \['dog'\] outside the run's classes"):
        read_node_data(str(tmp_path / "n"), DataConfig(image_size=8, classes="ant,cat,emu"), Task(3, 1))


def test_train_and_test_subfolders_and_rgb_to_the_models_channels(tmp_path: Path) -> None:
    _folder(tmp_path / "n" / "train", {"a": 3, "b": 2}, channels=3, size=12)
    _folder(tmp_path / "n" / "test", {"a": 1, "b": 1}, channels=3, size=12)
    images = read_node_data(str(tmp_path / "n"), DataConfig(image_size=8, labelled_per_client=4), Task(2, 1))
    assert images.train.x.shape == (4, 1, 8, 8)  # capped at labelled-per-client, grey, resized
    assert images.test.y.tolist() == [0, 1]


def test_an_npz_file_uint8_or_float_and_its_mistakes(tmp_path: Path) -> None:
    x = np.arange(5 * 8 * 8).astype(np.uint8).reshape(5, 8, 8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1, 1]), x_test=x[:2].astype(np.float32) / 255,
             y_test=np.array([1, 0]))
    images = read_node_data(str(tmp_path / "d.npz"), DataConfig(image_size=8, labelled_per_client=0), Task(2, 3))
    assert images.train.x.shape == (5, 3, 8, 8)  # grey repeated for an RGB model
    assert images.train.rows.dtype == torch.uint8  # stored as 8 bits, scaled per batch
    assert images.train.x[1, 2, 0, 1].item() == pytest.approx(65 / 255)  # image 1, row 0, column 1: 64 + 1
    torch.testing.assert_close(images.test.x[:, 0], images.train.x[:2, 0])
    np.savez(tmp_path / "bad.npz", images=x, y=np.zeros(5))
    with pytest.raises(DataError, match=r"has no \['x'\] array\(s\).*np.savez\(path, x=..., y=...\)"):
        read_node_data(str(tmp_path / "bad.npz"), DataConfig(), Task(2, 1))
    np.savez(tmp_path / "labels.npz", x=x, y=np.array([0, 1, 2, 0, 1]))
    with pytest.raises(DataError, match=r"labels \[2\] outside the model's 2 classes"):
        read_node_data(str(tmp_path / "labels.npz"), DataConfig(image_size=8), Task(2, 1))
    objects = np.empty(2, dtype=object)  # saved pickled; never unpickled: refused, not loaded
    np.savez(tmp_path / "obj.npz", x=objects, y=np.zeros(2))
    with pytest.raises(DataError, match="not a readable .npz"):
        read_node_data(str(tmp_path / "obj.npz"), DataConfig(), Task(2, 1))


def test_the_nodes_scenario_gives_the_task_from_config_and_the_servers_test_set(tmp_path: Path) -> None:
    cfg = DataConfig(scenario="nodes", classes="a, b ,c", channels=3, path=str(tmp_path / "nowhere"))
    assert task(cfg) == Task(3, 3)  # no file read: a node builds the model without the server's data
    with pytest.raises(DataError, match="needs data.classes"):
        task(DataConfig(scenario="nodes"))
    _folder(tmp_path / "server", {"a": 2, "b": 2, "c": 1}, channels=3)
    test = server_test_data(DataConfig(scenario="nodes", classes="a,b,c", image_size=8, path=str(tmp_path / "server")))
    assert len(test) == 5 and test.x.shape[1] == 3
    with pytest.raises(ConfigError, match="no source data for fedtl to pre-train"):
        build_model(make_config("data.scenario='nodes'", "data.classes='a,b,c'", f"data.path='{tmp_path}/server'"))


def test_a_node_trains_on_its_data_path_and_never_reads_a_partition(tmp_path: Path, task_identity: None) -> None:
    cfg = make_config("clients=3", "finetune.mode=full")
    export_partitions(cfg, tmp_path / "nodes")
    context = _node({"data-path": str(tmp_path / "nodes" / "node-1")})
    node = node_data(context, cfg)
    assert node.key == "node-7" and node.metrics == {} and not node.held_out
    mine, sim = node.train(), client_data(cfg.data, 1, 3, cfg.seed)
    # The same images (8-bit PNGs: each pixel within 0.5 / 255), read back by class rather than in partition order.
    order = lambda d: sorted(zip(d.y.tolist(), d.x.flatten(1).sum(1).tolist()))  # noqa: E731
    assert [y for y, _ in order(mine)] == [y for y, _ in order(sim)]
    assert [v for _, v in order(mine)] == pytest.approx([v for _, v in order(sim)], abs=mine.x[0].numel() * 0.5 / 255)
    assert len(node.test()) == len(client_test_data(cfg.data, 1, 3, cfg.seed))
    reply = handle_train(_instruction(cfg), context, cfg)
    assert reply.content["metrics"]["num-examples"] == 10 and "partition-id" not in reply.content["metrics"]
    evaluation = handle_evaluate(_instruction(cfg), context, cfg)
    assert evaluation.content["metrics"]["num-examples"] == len(node.test())
    held = _node({"data-path": str(tmp_path / "nodes" / "node-1"), "held-out": True})
    assert handle_train(_instruction(cfg), held, cfg).content.config_records["declined"]["reason"].startswith(
        "node node-7 is held out")


def test_a_node_with_a_missing_path_or_no_data_says_which_node_and_path(tmp_path: Path, task_identity: None) -> None:
    cfg = make_config("clients=3")
    missing = str(tmp_path / "not-here")
    with pytest.raises(DataError, match=rf"node 7: data-path '{missing}' does not exist on this node.*node-config"):
        handle_train(_instruction(cfg), _node({"data-path": missing}), cfg)
    with pytest.raises(DataError, match="node 7 has neither 'data-path' nor 'partition-id'"):
        handle_train(_instruction(cfg), _node({}), cfg)


def test_export_refuses_to_mix_into_an_existing_folder(tmp_path: Path) -> None:
    cfg = make_config("clients=2")
    folders = export_partitions(cfg, tmp_path)
    assert [f.name for f in folders] == ["node-0", "node-1"]
    assert sorted(p.name for p in (folders[0] / "train").iterdir()) == [f"{c:02d}" for c in range(10)]
    with pytest.raises(FileExistsError, match="node-0 exists"):
        export_partitions(cfg, tmp_path)


def test_devices_resolve_to_what_the_process_sees() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            resolve_device("cuda")


def test_a_deployment_on_own_data_needs_nothing_of_the_server_on_a_node(tmp_path: Path, task_identity: None) -> None:
    """The ``nodes`` scenario with outside weights: the server evaluates on its own folder, a node builds the
    same model from the config alone (the server's data.path does not exist on it) and trains its folder."""
    import torchvision.models as tvm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in tvm.get_model("resnet18", weights=None).state_dict().items()},
              str(tmp_path / "r18.safetensors"))
    _folder(tmp_path / "server", {"benign": 3, "malignant": 3}, channels=3, size=32)
    sets = ["data.scenario='nodes'", "data.classes='benign,malignant'", "data.channels=3", "data.image-size=32",
            "model.backbone=resnet18", f"model.weights-path='{tmp_path / 'r18.safetensors'}'", "finetune.mode=lora",
            "clients=2"]
    server_cfg = make_config(*sets, f"data.path='{tmp_path / 'server'}'")
    assert len(server_test_data(server_cfg.data)) == 6
    node_cfg = make_config(*sets, f"data.path='{tmp_path / 'only-on-the-server'}'")
    assert build_model(node_cfg).backbone_fingerprint == build_model(server_cfg).backbone_fingerprint
    _folder(tmp_path / "silo", {"benign": 5, "malignant": 4}, channels=1, size=20)  # grey, another size: fitted
    reply = handle_train(_instruction(server_cfg), _node({"data-path": str(tmp_path / "silo")}), node_cfg)
    assert reply.content["metrics"]["num-examples"] == 8  # 9 images, one kept as its own test image
    with pytest.raises(DataError, match="has no client data to partition: start each SuperNode with its own data"):
        handle_train(_instruction(server_cfg), _node({"partition-id": 0, "num-partitions": 2}), node_cfg)


def test_a_large_own_test_share_falls_back_to_a_plain_split(tmp_path: Path) -> None:
    _folder(tmp_path / "n", {"a": 4, "b": 1})  # "b" cannot give an image to both sides
    images = read_node_data(str(tmp_path / "n"), DataConfig(image_size=8, client_test_fraction=0.6,
                                                            labelled_per_client=0), Task(2, 1))
    assert (len(images.train), len(images.test)) == (2, 3)


def test_threads_follow_the_node_config_else_ray_else_torchs_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from fedtl.clients.app import set_threads

    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in a deployed ClientApp's process
    before = torch.get_num_threads()
    cfg = make_config()
    try:
        set_threads(_node({"threads": 1}), cfg)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        set_threads(_node({"data-path": "/x"}), cfg)  # no Ray: a deployed node keeps torch's count
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
