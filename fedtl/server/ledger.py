"""The privacy ledger: every client's reported spend, per round, and the run's guarantee.

Epsilons are never summed or averaged across clients: each client's data has its own
guarantee, so the run's statement is about the largest one. Each line of
``privacy.jsonl`` is written as its round ends.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.serverapp import RdpAccountant

from fedtl.config import ExperimentConfig
from fedtl.privacy import PrivacyMode
from fedtl.protocol import (
    DECLINED,
    NODE_ID,
    PARTITION_ID,
    PRIVACY_DELTA,
    PRIVACY_EPSILON,
    PRIVACY_NOISE,
    PRIVACY_SAMPLE_RATE,
    PRIVACY_STEPS,
)
from fedtl.reports.plots import plot_privacy
from fedtl.reports.runs import LEDGER_FILE, to_json, write_atomic
from fedtl.strategies.transfer import RoundReport

# Reply metric -> ledger column.
_COLUMNS = {PRIVACY_EPSILON: "epsilon", PRIVACY_DELTA: "delta", PRIVACY_STEPS: "steps",
            PRIVACY_NOISE: "noise_multiplier", PRIVACY_SAMPLE_RATE: "sample_rate"}


def client_label(metrics: dict[str, Any]) -> str:
    """A client's name in the ledger: its partition id, else (deployment) its node id."""
    return str(metrics[PARTITION_ID]) if PARTITION_ID in metrics else f"node-{metrics[NODE_ID]}"


class PrivacyLedger:
    """Records privacy spent in a run folder.

    Parameters
    ----------
    out_dir : Path
        The run folder; ``privacy.jsonl`` and ``privacy.png`` go there.
    cfg : ExperimentConfig
        The run's config (its ``privacy`` section).
    mode : PrivacyMode
        The run's privacy mode: its level and guarantee (clients report their own spend, or ``accountant`` holds it).
    accountant : RdpAccountant, optional
        The server's accountant under client-level DP.
    resume_round : int, optional
        A resumed run's checkpoint round: the lines up to it are kept, later ones dropped.
    """

    def __init__(self, out_dir: Path, cfg: ExperimentConfig, mode: PrivacyMode,
                 accountant: RdpAccountant | None = None, resume_round: int | None = None) -> None:
        self.out = Path(out_dir)
        self.path = self.out / LEDGER_FILE
        self.cfg, self.mode, self.accountant = cfg, mode, accountant
        self.latest: dict[str, float] = {}
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self.declined: set[str] = set()
        kept = [] if resume_round is None or not self.path.is_file() else [
            row for row in map(json.loads, self.path.read_text().splitlines()) if row["round"] <= resume_round]
        write_atomic(self.path, "")  # a resumed run's lines after its checkpoint are gone: the rounds run again
        self._append(kept)

    def on_round(self, report: RoundReport) -> None:
        """Record the spend reported in round ``report.round``."""
        rows = []
        if self.accountant is not None:
            spent = self.accountant.get_privacy_spent()
            rows.append({"round": report.round, "client": "all", "epsilon": spent.epsilon, "delta": spent.delta,
                         "releases": spent.num_releases, "noise_multiplier": self.noise_multiplier})
        for metrics in report.clients:
            if PRIVACY_EPSILON in metrics:
                row = {"round": report.round, "client": client_label(metrics), "node_id": metrics[NODE_ID],
                       "declined": metrics[DECLINED]}
                rows.append({**row, **{col: metrics[key] for key, col in _COLUMNS.items() if key in metrics}})
        self._append(rows)

    def _append(self, rows: list[dict[str, Any]]) -> None:
        with self.path.open("a") as f:
            for row in rows:
                f.write(to_json(row) + "\n")
                self.latest[row["client"]] = row["epsilon"]
                self.curves.setdefault(row["client"], []).append((row["round"], row["epsilon"]))
                if row.get("declined"):
                    self.declined.add(row["client"])

    @property
    def noise_multiplier(self) -> float | None:
        """Client-level: the noise multiplier of the releases composed so far."""
        comps = self.accountant.state_dict()["compositions"] if self.accountant is not None else []
        return comps[-1]["event"]["noise_multiplier"] if comps else None  # type: ignore[index]

    @property
    def epsilon(self) -> float:
        """The largest epsilon any client (or, client-level, the run) has spent so far."""
        return max(self.latest.values(), default=0.0)

    def guarantee(self) -> str:
        """The run's guarantee in one sentence (the privacy mode's own)."""
        return self.mode.guarantee(self.cfg.privacy, self.epsilon, self.noise_multiplier)

    def summary(self) -> dict[str, Any]:
        """The ledger's part of ``summary.json``."""
        p = self.cfg.privacy
        return {
            "mode": p.mode, "level": self.mode.level, "delta": p.delta, "epsilon_max": self.epsilon,
            "epsilon_per_client": dict(sorted(self.latest.items())), "budget": p.budget,
            "clients_out_of_budget": sorted(self.declined), "guarantee": self.guarantee(),
        }

    def plot(self, rows: Sequence[dict[str, Any]]) -> Path:
        """``privacy.png``: epsilon per round per client, and accuracy against epsilon."""
        points = [(r["epsilon"], r["accuracy"]) for r in rows if "epsilon" in r]
        return plot_privacy(self.curves, points, self.out / "privacy.png",
                            title=f"{self.cfg.name}: {self.cfg.privacy.mode}")
