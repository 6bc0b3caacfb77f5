"""Docs that must stay true: the README's size, measured tables copied from committed result files."""

from __future__ import annotations

import re

import pytest

from tests.helpers import ROOT

DOCS = ROOT / "docs"
# Study sections of docs/studies.md whose tables come from committed result files.
COMMITTED = {"### `modes.toml`": DOCS / "results" / "modes" / "results.md",
             "### What privacy costs in accuracy": DOCS / "results" / "privacy-sweep" / "results.md",
             "### `clients.toml`": DOCS / "results" / "clients" / "results.md",
             "### `heterogeneity.toml`": DOCS / "results" / "heterogeneity" / "results.md",
             "### `imagenet-transfer.toml`": DOCS / "results" / "imagenet-transfer" / "results.md",
             "### `photographs.toml`": DOCS / "results" / "photographs" / "results.md",
             "### `lora-aggregation.toml`": DOCS / "results" / "lora-aggregation" / "results.md",
             "### `lora-aggregation-imagenet.toml`": DOCS / "results" / "lora-aggregation-imagenet" / "results.md",
             "### Real sizes: `make bench-perf`": ROOT / "benchmarks" / "results" / "perf.md"}


def _table(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return rows[0], [r for r in rows[2:]]


def _first_table(text: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return _table(lines[start:end])


def test_the_readme_is_the_front_door() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 15 * 1024


@pytest.mark.parametrize("section", sorted(COMMITTED))
def test_measured_tables_are_copied_from_committed_result_files(section: str) -> None:
    studies = (DOCS / "studies.md").read_text()
    body = studies.split(section, 1)[1].split("\n### ", 1)[0]
    header, rows = _first_table(body)
    full_header, full_rows = _first_table(COMMITTED[section].read_text())
    by_config = {r[0]: dict(zip(full_header, r)) for r in full_rows}
    assert [r[0] for r in rows] == list(by_config)  # every configuration, in the report's order
    for row in rows:
        for column, cell in zip(header, row):
            assert by_config[row[0]][column] == cell, (row[0], column)


def test_docs_links_resolve() -> None:
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: {target}"
