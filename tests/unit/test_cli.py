"""The fedtl command's face: whole tables off a terminal, no traceback for a user's mistake."""

from __future__ import annotations

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
