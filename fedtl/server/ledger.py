"""The privacy ledger: every client's reported spend, per round, and the run's guarantee.

Epsilons are never summed or averaged across clients: each client's data has its own
guarantee, so the run's statement is about the largest one. Each line of
``privacy.jsonl`` is written as its round ends.

Under DP-SGD the ledger counts what each client spent, not what the server merged: a node sent
a round's training whose reply never came back (or was an error) may have trained all the same,
and if it never reports again its spend would be missing. So the ledger keeps its own count of
every client's steps: a round it was sent counts its steps (``local-epochs`` x steps an epoch at
its sample rate) unless the client declined it, whatever the client reports; a client that does
report more (a resumed run's lost round) is counted at what it reports. The noise and sample
rate are the client's own (reported), or, before it ever reported, computed from the examples
it declared, as the client computes them (``fedtl.accounting.client_start``). A node that
declared no count and never reported has an unknown spend, which the guarantee says.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.serverapp import RdpAccountant

from fedtl.accounting import (
    client_start,
    replace_one_epsilon,
    replace_one_sample_epsilon,
    sample_epsilon,
    steps_per_round,
)
from fedtl.config import ExperimentConfig
from fedtl.errors import AccountantError
from fedtl.privacy import BOUNDING_ACCOUNTANTS, PrivacyMode
from fedtl.protocol import (
    DECLINED,
    NODE_ID,
    NUM_EXAMPLES,
    PARTITION_ID,
    PRIVACY_DELTA,
    PRIVACY_EPSILON,
    PRIVACY_NOISE,
    PRIVACY_SAMPLE_RATE,
    PRIVACY_STEPS,
)
from fedtl.reports.plots import plot_privacy
from fedtl.reports.runs import to_json, write_atomic
from fedtl.run_folder import (
    ACCOUNTANTS_SKIPPED,
    CLIENTS_OUT_OF_BUDGET,
    CLIENTS_SPEND_UNKNOWN,
    EPSILON_MAX,
    EPSILON_MAX_BY_ACCOUNTANT,
    EPSILON_MAX_TIGHTEST,
    EPSILON_PER_CLIENT,
    EPSILON_REPLACE_ONE,
    LEDGER_FILE,
    PRIVACY_PLOT,
)
from fedtl.strategies.report import RoundReport

# Reply metric -> ledger column.
_COLUMNS = {PRIVACY_EPSILON: "epsilon", PRIVACY_DELTA: "delta", PRIVACY_STEPS: "steps",
            PRIVACY_NOISE: "noise_multiplier", PRIVACY_SAMPLE_RATE: "sample_rate"}
_SPENT = {"noise_multiplier", "sample_rate", "steps"}  # the columns a client's spend is counted from


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
    round_epochs : callable, optional
        Round -> the local epochs its plan trains (default: ``finetune.local-epochs``).
    """

    def __init__(self, out_dir: Path, cfg: ExperimentConfig, mode: PrivacyMode,
                 accountant: RdpAccountant | None = None, resume_round: int | None = None,
                 round_epochs: Callable[[int], int] | None = None) -> None:
        self.out = Path(out_dir)
        self.path = self.out / LEDGER_FILE
        self.cfg, self.mode, self.accountant = cfg, mode, accountant
        self.round_epochs = round_epochs or (lambda rnd: cfg.finetune.local_epochs)
        self.latest: dict[str, float] = {}
        # epsilon of (sigma, q, steps, accountant), None where that accountant cannot state it (reason in ``skipped``)
        self._by_history: dict[tuple[float, float, int, str], float | None] = {}
        self.skipped: dict[str, str] = {}  # accountant -> why it stated nothing for some client
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self.declined: set[str] = set()
        self.spent: dict[str, tuple[float, float, int]] = {}  # client -> (noise, sample rate, steps) as counted here
        self.unknown: set[str] = set()  # clients sent training whose spend cannot be counted
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
                rows.append(self._reported(report.round, metrics))
        if self.mode.per_sample:
            rows += [self._charged(report.round, node) for node in report.unanswered]
        self._append(rows)

    def _round_steps(self, rnd: int, sample_rate: float) -> int:
        return steps_per_round(self.round_epochs(rnd), sample_rate)

    def _epsilon(self, sigma: float, q: float, steps: int) -> float:
        p = self.cfg.privacy
        return sample_epsilon([(sigma, q, steps)], accountant=p.accountant, delta=p.delta)

    def _reported(self, rnd: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """A reply's row: what it reports, or more where the ledger counted more steps."""
        label = client_label(metrics)
        row = {"round": rnd, "client": label, "node_id": metrics[NODE_ID], "declined": metrics[DECLINED],
               **{col: metrics[key] for key, col in _COLUMNS.items() if key in metrics}}
        before = self.spent.get(label)
        if before is None or not _SPENT <= row.keys():
            return row
        sigma, q = row["noise_multiplier"], row["sample_rate"]
        counted = before[2] + (0 if row["declined"] else self._round_steps(rnd, q))
        if counted > row["steps"]:  # a round it was sent and did not report (its reply was lost) is still spent
            row.update(reported_steps=row["steps"], steps=counted, epsilon=self._epsilon(sigma, q, counted))
        return row

    def _start(self, examples: int | None) -> tuple[float, float] | None:
        """A client's noise and sample rate from its declared count, as it computes them; ``None`` if it
        declared none, or no noise reaches the target (it then trains nothing)."""
        try:
            return None if examples is None else client_start(self.cfg, examples)
        except ValueError:
            return None

    def _charged(self, rnd: int, node: dict[str, int]) -> dict[str, Any]:
        """The row of a node sent this round's training with no reply but an error: charged the round."""
        label, p = client_label(node), self.cfg.privacy
        row: dict[str, Any] = {"round": rnd, "client": label, "node_id": node[NODE_ID], "declined": False,
                               "unanswered": True}
        if label in self.spent:
            sigma, q, steps = self.spent[label]
        else:
            start = self._start(node.get(NUM_EXAMPLES))
            if start is None:  # neither a report nor a declared count: its spend is unknown
                return {**row, "epsilon": None}
            (sigma, q), steps = start, 0
        extra = self._round_steps(rnd, q)
        epsilon = self._epsilon(sigma, q, steps + extra)
        if p.budget is None or epsilon <= p.budget:
            steps += extra
        else:  # over its budget, the client declines before training: it spent nothing more
            epsilon = self._epsilon(sigma, q, steps) if steps else 0.0
        return {**row, "epsilon": epsilon, "delta": p.delta, "steps": steps, "noise_multiplier": sigma, "sample_rate": q}

    def _append(self, rows: list[dict[str, Any]]) -> None:
        with self.path.open("a") as f:
            for row in rows:
                f.write(to_json(row) + "\n")
                client = row["client"]
                if row["epsilon"] is None:
                    if client not in self.spent:
                        self.unknown.add(client)
                    continue
                self.unknown.discard(client)
                self.latest[client] = row["epsilon"]
                self.curves.setdefault(client, []).append((row["round"], row["epsilon"]))
                if _SPENT <= row.keys():
                    self.spent[client] = (row["noise_multiplier"], row["sample_rate"], row["steps"])
                if row.get("declined"):
                    self.declined.add(client)

    def _by_accountant(self) -> dict[str, float | None]:
        """The largest client's steps under each of Opacus's accountants, side by side (GDP approximates; ``None``:
        that accountant cannot state them here, ``skipped`` says why). One client only: PRV takes about a second an
        evaluation here, RDP milliseconds."""
        counted = [c for c in self.latest if c in self.spent]
        if not counted:
            return {}
        largest = self.spent[max(counted, key=self.latest.__getitem__)]
        return {name: self._under(largest, name) for name in ("rdp", "prv", "gdp")}

    def _under(self, spent: tuple[float, float, int], accountant: str) -> float | None:
        """A client's steps under ``accountant`` (each distinct one computed once: PRV takes about a second), or
        ``None`` where it cannot state them (too little noise for its method: a summary never crashes on it)."""
        key = (*spent, accountant)
        if key not in self._by_history:
            try:
                self._by_history[key] = sample_epsilon([spent], accountant=accountant, delta=self.cfg.privacy.delta)
            except AccountantError as err:
                self._by_history[key], self.skipped[accountant] = None, str(err)
        return self._by_history[key]

    def replace_one(self) -> float | None:
        """The run's epsilon under replace-one adjacency. DP-SGD: the largest client's, the one that holds with
        counts published (``fedtl.accounting.replace_one_sample_epsilon``); client-level: one client's updates
        replaced by another's (``fedtl.accounting.replace_one_epsilon``). ``None`` before any client has reported."""
        if self.accountant is not None:
            return replace_one_epsilon(self.accountant)
        counted = [self.spent[c] for c in self.latest if c in self.spent]
        if not counted:
            return None
        for spent in counted:
            key = (*spent, "replace-one")
            if key not in self._by_history:
                self._by_history[key] = replace_one_sample_epsilon([spent], delta=self.cfg.privacy.delta)
        return max(self._by_history[(*spent, "replace-one")] or 0.0 for spent in counted)

    def tightest(self) -> float | None:
        """The run's epsilon by the tighter of Opacus's two bounding accountants (RDP, PRV) for each client, then
        the largest over clients: each client's smaller upper bound is still one. ``None`` under GDP, which bounds
        nothing, or before any client has reported. An accountant that cannot state a client's steps is left out
        for it. Budgets and calibration stay on ``privacy.accountant``: PRV takes about a second an evaluation
        here, and calibrating the noise evaluates dozens of times."""
        counted = [c for c in self.latest if c in self.spent]
        if self.cfg.privacy.accountant not in BOUNDING_ACCOUNTANTS or not counted:
            return None
        bounds = [[e for a in BOUNDING_ACCOUNTANTS if (e := self._under(self.spent[c], a)) is not None]
                  for c in counted]
        return max(min(b) for b in bounds) if all(bounds) else None

    @property
    def noise_multiplier(self) -> float | None:
        """Client-level: the noise multiplier of the releases composed so far."""
        comps = self.accountant.state_dict()["compositions"] if self.accountant is not None else []
        return comps[-1]["event"]["noise_multiplier"] if comps else None  # type: ignore[index]

    @property
    def epsilon(self) -> float:
        """The largest epsilon any client (or, client-level, the run) has spent so far."""
        return max(self.latest.values(), default=0.0)

    def guarantee(self, tightest: float | None = None, replace_one: float | None = None) -> str:
        """The run's guarantee in one sentence (the privacy mode's own, with ``replace_one``: the largest epsilon
        under replace-one adjacency), the tighter bound where ``tightest`` is one (``tightest()``), which
        accountants stated nothing, and whose spend is unknown."""
        if replace_one is None:
            replace_one = self.replace_one()
        sentence = self.mode.guarantee(self.cfg.privacy, self.epsilon, self.noise_multiplier, replace_one)
        if tightest is not None and tightest < self.epsilon * (1 - 1e-9):
            sentence += (f". Tighter under add-or-remove, by the smaller of Opacus's RDP and PRV bounds on each "
                         f"client's steps (both upper bounds): ε ≤ {tightest:.4g} at the same δ")
        if self.skipped:
            sentence += f". Not stated by {', '.join(sorted(self.skipped))} (too little noise for its method)"
        if self.unknown:
            sentence += (f". Unknown spend, not covered by the bound: client(s) {', '.join(sorted(self.unknown))} "
                         "were sent training, never replied, and declared no example count")
        return sentence

    def summary(self) -> dict[str, Any]:
        """The ledger's part of ``summary.json``."""
        p = self.cfg.privacy
        # Client-level: Flower's RDP accountant on the server; sample-level: each client's Opacus accountant.
        tightest, replace_one = (None if self.accountant is not None else self.tightest()), self.replace_one()
        if self.accountant is not None:
            run_level: dict[str, Any] = {"accountant": "flower-rdp"}
        else:
            run_level = {"accountant": p.accountant, EPSILON_MAX_BY_ACCOUNTANT: self._by_accountant(),
                         EPSILON_MAX_TIGHTEST: tightest, ACCOUNTANTS_SKIPPED: dict(sorted(self.skipped.items()))}
        return {
            "mode": p.mode, "level": self.mode.level, "delta": p.delta, EPSILON_MAX: self.epsilon, **run_level,
            EPSILON_REPLACE_ONE: replace_one,
            EPSILON_PER_CLIENT: dict(sorted(self.latest.items())), "budget": p.budget,
            CLIENTS_OUT_OF_BUDGET: sorted(self.declined), CLIENTS_SPEND_UNKNOWN: sorted(self.unknown),
            "guarantee": self.guarantee(tightest, replace_one),
        }

    def plot(self, rows: Sequence[dict[str, Any]]) -> Path:
        """``privacy.png``: epsilon per round per client, and accuracy against epsilon."""
        points = [(r["epsilon"], r["accuracy"]) for r in rows if "epsilon" in r]
        return plot_privacy(self.curves, points, self.out / PRIVACY_PLOT,
                            title=f"{self.cfg.name}: {self.cfg.privacy.mode}")
