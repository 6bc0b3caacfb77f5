"""Studies end to end: a 2-point grid on real Flower + Ray, resume, the report in Chromium (how several
seeds aggregate is tested in tests/unit/test_study.py)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from fedtl.errors import StudyError
from fedtl.reports.report import build_report
from fedtl.simulations.study import load_study, run_study
from tests.helpers import CACHE, run_fedtl

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
STUDY = f"""
[study]
name = "tiny"
seeds = [0]
target-accuracy = 0.2

[study.set]
clients = 3
rounds = 2
"pretrain.epochs" = 2
"pretrain.cache-dir" = "{CACHE}"
"data.held-out-clients" = 1
"data.partitioner" = "dirichlet"

[study.grid]
"finetune.mode" = ["feature-extraction", "full"]
"""


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study, run once for the module's tests."""
    folder = tmp_path_factory.mktemp("study")
    (folder / "tiny.toml").write_text(STUDY)
    done = run_fedtl("study", str(folder / "tiny.toml"), "--out", str(folder / "out"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return folder


def test_study_runs_every_point_and_seed_and_writes_the_table(study_dir: Path) -> None:
    out = study_dir / "out"
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["runs"]) == 2 and plan["command"].startswith("fedtl study ")
    # Scratch baselines are shared by the runs whose baseline is the same config: the mode
    # does not change it (scratch is always full).
    assert len({r["scratch_dir"] for r in plan["runs"]}) == 1
    rows = list(csv.reader((out / "report" / "results.csv").open()))
    header, body = rows[0], rows[1:]
    assert len(body) == 2 and {r[1] for r in body} == {"1"}
    for column in ("final accuracy", "transfer gain", "worst-10 % client accuracy", "ECE", "bytes per round",
                   "held-out accuracy after local fine-tuning", "rounds to 0.200"):
        assert column in header, column
    md = (out / "report" / "results.md").read_text()
    assert md.count("\n") == 4 and "finetune.mode=full" in md
    for figure in ("curves", "scratch", "bytes", "clients", "domains", "adaptability", "confusion", "saliency"):
        assert (out / "report" / f"{figure}.png").stat().st_size > 5_000, figure


@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_rerun_skips_finished_runs_and_resumes_or_redoes_an_interrupted_one(study_dir: Path,
                                                                            checkpoint: bool) -> None:
    out = study_dir / "out"
    victim = out / "runs" / "mode-full-s0"
    (victim / "summary.json").unlink()  # as if the run had been killed before its end
    resume = victim / "checkpoints" / "resume.safetensors"
    saved = resume.read_bytes()
    if not checkpoint:
        resume.unlink()  # killed before its first checkpoint: it starts again
    before = {p: p.stat().st_mtime_ns for p in out.glob("**/summary.json")}
    ran: list[tuple[str, bool, bool]] = []

    def simulate(cfg, overwrite: bool = False, resume: bool = False) -> dict:
        ran.append((cfg.out, overwrite, resume))
        shutil.copy(out / "runs" / "mode-feature-extraction-s0" / "summary.json", Path(cfg.out) / "summary.json")
        return {}

    try:
        spec = load_study(study_dir / "tiny.toml")
        run_study(spec, out, command="test", console=Console(quiet=True), simulate=simulate)
        # With its checkpoint it continues; without, its folder is replaced.
        assert ran == [(str(victim), not checkpoint, checkpoint)]
        assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    finally:
        resume.write_bytes(saved)


def test_a_changed_study_is_refused_rather_than_mixed(study_dir: Path) -> None:
    changed = study_dir / "changed.toml"
    changed.write_text(STUDY.replace("rounds = 2", "rounds = 3"))
    with pytest.raises(StudyError, match="holds a run of another config"):
        run_study(load_study(changed), study_dir / "out", command="test", console=Console(quiet=True),
                  simulate=lambda cfg, **_: pytest.fail("nothing may run"))


def test_report_renders_in_headless_chromium(study_dir: Path, tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        if os.environ.get("FEDTL_REQUIRE_BROWSER"):
            pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install chromium)")
        pytest.skip("no /usr/bin/chromium (Debian's chromium); `make test` installs it as root")
    from playwright.sync_api import sync_playwright

    page_path = build_report(study_dir / "out")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(page_path.as_uri())
        rows = page.locator("table tr").count()
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        title = page.locator("h1").inner_text()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert title == "Study: tiny"
    assert rows == 1 + 2  # header + one row per configuration
    assert len(images) >= 8 and all(done and width > 100 for done, width in images)
    assert (tmp_path / "report.png").stat().st_size > 50_000


def test_cli_report_and_compare(study_dir: Path) -> None:
    from typer.testing import CliRunner

    from fedtl.cli import app

    def fedtl(*args: str) -> tuple[int, str]:  # in this process: the commands run no simulation
        result = CliRunner().invoke(app, list(args))
        return result.exit_code, " ".join(result.output.split())

    out = study_dir / "out"
    code, text = fedtl("report", str(out))
    assert code == 0 and "report:" in text
    a, b = out / "runs" / "mode-full-s0", out / "runs" / "mode-feature-extraction-s0"
    code, text = fedtl("compare", str(a), str(b))
    assert code == 0 and "final_accuracy" in text and "travelling_params" in text
    code, text = fedtl("report", str(study_dir))
    assert code == 2 and "holds no study" in text
