"""ExperimentConfig: round trips and every validation error."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from fedtl.config import ConfigError, ExperimentConfig, FinetuneConfig, apply_overrides, from_dict, load_config
from fedtl.config.fields import flatten
from fedtl.config.load import flwr_app_config_table

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_round_trip_through_run_config() -> None:
    cfg = ExperimentConfig()
    flat = cfg.to_run_config()
    assert flat["finetune.mode"] == "feature-extraction" and flat["data.labelled-per-client"] == 10
    assert ExperimentConfig.from_run_config(flat) == cfg


def test_changed_values_round_trip_through_run_config_and_toml() -> None:
    cfg = load_config(None, ["finetune.mode=discriminative", "rounds=3", "data.alpha=0.1", "pretrain.augment=false", "finetune.lr=1"])
    assert ExperimentConfig.from_run_config(cfg.to_run_config()) == cfg
    assert from_dict(tomllib.loads(cfg.to_toml())) == cfg
    assert cfg.finetune.lr == 1.0 and isinstance(cfg.finetune.lr, float)


def test_unknown_key_lists_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'finetune.mdoe'.*finetune.mode"):
        from_dict({"finetune": {"mdoe": "full"}})
    with pytest.raises(ConfigError, match=r"'round'.*rounds"):
        from_dict({"round": 3})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"rounds": "ten"}, r"'rounds' must be int, got str"),
        ({"rounds": True}, r"'rounds' must be int, got bool"),
        ({"pretrain": {"augment": 1}}, r"'pretrain.augment' must be bool, got int"),
        ({"finetune": {"lr": "0.1"}}, r"'finetune.lr' must be float, got str"),
        ({"finetune": 3}, r"'finetune' must be a table"),
    ],
)
def test_wrong_type_names_the_key_and_type(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"rounds": 0}, r"'rounds' = 0 is out of range; allowed: \[1, 100000\]"),
        ({"data": {"alpha": 0.0}}, r"'data.alpha' = 0.0 is out of range; allowed: \(0.0, inf\]"),
        ({"finetune": {"momentum": 1.5}}, r"'finetune.momentum' = 1.5 is out of range; allowed: \[0.0, 1.0\]"),
        ({"finetune": {"lr": float("nan")}}, r"'finetune.lr' must be finite"),
    ],
)
def test_out_of_range_names_the_allowed_range(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_choices_come_from_the_registries() -> None:
    with pytest.raises(ConfigError, match=r"'finetune.mode' = 'fulll' is not allowed. Did you mean 'full'"):
        from_dict({"finetune": {"mode": "fulll"}})
    with pytest.raises(ConfigError, match=r"Allowed: .*small-cnn"):
        from_dict({"model": {"backbone": "vgg"}})
    with pytest.raises(ConfigError, match=r"Allowed: pretrained, scratch"):
        from_dict({"init": "random"})


def test_cross_field_check() -> None:
    with pytest.raises(ConfigError, match=r"min-available-nodes = 5 exceeds clients = 3"):
        from_dict({"clients": 3, "strategy": {"min-available-nodes": 5}})


def test_set_accepts_full_and_unique_leaf_keys() -> None:
    raw = apply_overrides({}, ["finetune.mode=discriminative", "data.partitioner=dirichlet", "rounds=20", 'name="x y"'])
    assert raw == {"finetune": {"mode": "discriminative"}, "data": {"partitioner": "dirichlet"}, "rounds": 20,
                   "name": "x y"}


def test_set_errors() -> None:
    with pytest.raises(ConfigError, match=r"'lr' is ambiguous: use one of finetune.lr, pretrain.lr"):
        apply_overrides({}, ["lr=0.1"])
    with pytest.raises(ConfigError, match=r"not of the form key=value"):
        apply_overrides({}, ["rounds"])
    with pytest.raises(ConfigError, match=r"unknown config key 'moed'.*finetune.mode"):
        apply_overrides({}, ["moed=full"])


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_config(bad)


def test_load_config_makes_the_cache_dir_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config().pretrain.cache_dir == str(tmp_path / ".fedtl-cache")


def test_scratch_variant() -> None:
    s = ExperimentConfig().as_scratch()
    assert (s.init, s.finetune.mode, s.finetune.backbone_lr_scale) == ("scratch", "full", 1.0)


def test_pyproject_flower_config_is_the_defaults() -> None:
    """`flwr run .` must run the same default study as `fedtl simulate`."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert from_dict(table) == ExperimentConfig()
    assert table == tomllib.loads(flwr_app_config_table())["tool"]["flwr"]["app"]["config"]  # every key, none extra
    assert table["finetune"]["batchnorm"] == "auto"  # resolved by each run: `--run-config init='scratch'` -> batch


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_experiments_load(path: Path, tmp_path: Path) -> None:
    """Configs load and hold what their file sets; study files plan every run (each config validated, holding its
    grid point and seed, or refused where the study skips invalid points) and split its data."""
    from fedtl.data.federated import check_partitions
    from fedtl.simulations.study import load_study, plan_study

    if "[study]" not in path.read_text():
        written = flatten(tomllib.loads(path.read_text()))
        held = load_config(path, resolve_paths=False).to_run_config()
        assert {key: held[key] for key in written} == written
        return
    spec = load_study(path)
    runs = plan_study(spec, tmp_path)
    points = len(spec.cases) * math.prod(len(values) for _, values in spec.axes)
    assert len(runs) + len(runs.skipped) * len(spec.seeds) == points * len(spec.seeds)
    assert runs and (spec.skip_invalid or not runs.skipped)
    for run in runs:
        held = run.cfg.to_run_config()
        assert {key: held[key] for key in run.values} == run.values and run.cfg.seed == run.seed
        check_partitions(run.cfg.data, run.cfg.clients, run.cfg.seed)


def test_configs_built_in_code_are_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"'finetune.lr' = -1.0 is out of range"):
        FinetuneConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"'rounds' = 0 is out of range"):
        ExperimentConfig().replace(rounds=0)
    with pytest.raises(ConfigError, match=r"'finetune' must be a FinetuneConfig"):
        ExperimentConfig(finetune={"lr": 0.1})  # type: ignore[arg-type]
    assert FinetuneConfig(lr=1).lr == 1.0 and isinstance(FinetuneConfig(lr=1).lr, float)


def test_docs_config_md_is_the_generated_reference() -> None:
    from fedtl.config.reference import markdown

    committed = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    assert committed == markdown(), "docs/config.md is stale: run `fedtl config --markdown > docs/config.md`"
    assert "| `finetune.lora-rank` | int | `4` | [1, 4096] |" in committed  # type, default and range come from the schema


def test_reference_reads_each_fields_comment() -> None:
    from fedtl.config.reference import field_comments

    comments = field_comments(FinetuneConfig)
    assert comments["lora_targets"].startswith("Which layers of those blocks LoRA adapts")
    assert all(comments[name] for name in ("lr", "mode", "batch_size"))


@pytest.mark.parametrize(("sets", "message"), [
    (["roundz=3"], "unknown config key 'roundz'. Did you mean rounds?"),
    (["finetune.lr=-1"], "config key 'finetune.lr' = -1.0 is out of range"),
    (["data.alpha=true"], "config key 'data.alpha' must be float"),
])
def test_a_bad_config_fails_before_torch_flower_or_ray_are_imported(sets: list[str], message: str) -> None:
    import subprocess
    import sys

    argv = ["fedtl", "simulate", *(a for s in sets for a in ("--set", s))]
    code = ("import atexit, sys; atexit.register(lambda: print(sorted({'torch', 'flwr', 'ray'} & set(sys.modules)), "
            f"file=sys.stderr)); sys.argv = {argv!r}; from fedtl.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        **__import__("os").environ, "COLUMNS": "200"})
    assert done.returncode == 2
    assert message in " ".join(done.stdout.split()) and "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]"
