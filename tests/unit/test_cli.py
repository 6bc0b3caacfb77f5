"""The fedtl command's face: whole tables off a terminal, no traceback for a user's mistake."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_tables_print_whole_when_stdout_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from fedtl import cli

    name, blocks = "mobilenet_v3_small" * 4, ", ".join(f"stage{i}" for i in range(40))
    cli._table("backbones", ["backbone", "blocks"], [[name, blocks]])
    out = capsys.readouterr().out
    assert f"| {name} | {blocks} |" in out  # a Markdown row, nothing cut to 80 columns
    assert "…" not in out


def test_a_user_error_is_one_line_without_traceback() -> None:
    from typer.testing import CliRunner

    from fedtl.cli import app

    result = CliRunner().invoke(app, ["config", "--set", "finetune.mode=ful"])
    assert result.exit_code == 2
    assert "Did you mean 'full'?" in " ".join(result.output.split()) and "Traceback" not in result.output


@pytest.mark.parametrize(("args", "problem"), [
    (["--config", "{latin1}"], "is not UTF-8 text (byte 0xe9 at position 11)"),
    (["--set", "data.channels=2"], "'data.channels' = 2 is not allowed. Allowed: 1, 3"),
    (["--out", "{file}"], "is a file, not a folder"),
    # These two hung: Flower waited for an actor pool Ray could never fill, ray.init retried for minutes.
    (["--set", "simulation.num-cpus=4096"], "simulation.num-cpus = 4096 per client, but this machine has"),
    (["--set", "simulation.ray-address='127.0.0.1:1'"], "no Ray cluster answers there"),
])
def test_bad_input_to_simulate_is_one_line_that_names_the_fix(tmp_path, args: list[str], problem: str) -> None:
    from typer.testing import CliRunner

    from fedtl.cli import app
    from tests.helpers import CACHE

    latin1, file = tmp_path / "latin1.toml", tmp_path / "a-file"
    latin1.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    file.write_text("")
    args = [a.format(latin1=latin1, file=file) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, ["simulate", *args, *out, "--set", f"pretrain.cache-dir={str(CACHE)!r}"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and problem in text, text
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "problem"), [
    (["--epsilons", "1,three"], "--epsilons '1,three': give numbers separated by commas"),
    (["--canaries", "10", "--guesses", "20"], "between 1 and that many guesses"),
    (["--epsilons", "3"], "privacy.mode = 'off' spends no epsilon, so epsilon = 3 has nothing to audit"),
])
def test_bad_input_to_audit_is_one_line_before_any_run(tmp_path, args: list[str], problem: str) -> None:
    from typer.testing import CliRunner

    from fedtl.cli import app

    result = CliRunner().invoke(app, ["audit", *args, "--out", str(tmp_path / "audit")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and problem in text, text
    assert "Traceback" not in result.output and not (tmp_path / "audit").exists()


def test_resume_refuses_what_it_cannot_continue(tmp_path) -> None:
    from typer.testing import CliRunner

    from fedtl.cli import app
    from tests.helpers import make_config

    def says(*args: str) -> str:
        result = CliRunner().invoke(app, ["simulate", *args])
        assert result.exit_code == 2 and "Traceback" not in result.output
        return " ".join(result.output.split())

    run = tmp_path / "run"
    assert "no config.toml there" in says("--resume", str(run))
    assert "pass no --config, --set" in says("--resume", str(run), "--set", "rounds=3")
    run.mkdir()
    (run / "config.toml").write_text(make_config(f"out={str(run)!r}").to_toml())
    assert "holds no resume checkpoint" in says("--resume", str(run))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "resume.safetensors").write_bytes(b"\0" * 64)
    assert "cannot be read" in says("--resume", str(run))


def test_runs_whose_clients_keep_state_are_not_resumed_without_their_node_states(tmp_path: Path) -> None:
    # A simulated client's DP-SGD accountant would start again from zero: a guarantee it does not have.
    from fedtl.errors import RunFolderError
    from fedtl.simulations.node_state import check_resumable
    from tests.helpers import make_config

    out = f"out={str(tmp_path)!r}"
    with pytest.raises(RunFolderError, match="keep a DP-SGD accountant in their node state, and its node-state/"):
        check_resumable(make_config("privacy.mode=dp-sgd", out))
    with pytest.raises(RunFolderError, match="keep personal layers"):
        check_resumable(make_config("strategy.personalisation=fedper", "finetune.mode=full", out))
    check_resumable(make_config("privacy.mode=client-level", "strategy.personalisation=fedbabu", "finetune.mode=full", out))
    (tmp_path / "node-state").mkdir()
    check_resumable(make_config("privacy.mode=dp-sgd", out))
