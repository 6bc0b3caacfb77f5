"""The empirical privacy audit's statistics: a lower bound on epsilon from one training run.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023):
``m`` canaries are each planted with probability 1/2 (independent coins); after training, an
auditor who guesses ``r`` of the coins (abstaining on the rest) and gets ``v`` right refutes
(epsilon, delta)-DP at confidence ``1 - p`` when ``v`` right guesses would have chance below ``p``
under it. For epsilon-DP the count of right guesses is dominated by ``Binomial(r, q)`` with
``q = e^eps / (1 + e^eps)``; a delta adds at most ``2 m delta alpha`` (their Theorem 3.1, with
``alpha`` as ``p_value`` computes it). The guess is the membership-inference test of a loss
threshold: the ``k+`` canaries with the lowest loss on the released model are guessed planted,
the ``k-`` with the highest not. ``k+`` and ``k-`` are fixed before the run, never tuned on its
scores: choosing them afterwards would test many hypotheses and void the confidence.

The result is a *lower* bound: the run is not (bound, delta)-DP, with 95% confidence. The
accountant's epsilon is an upper bound; an audit whose lower bound passes it has found a leak
(or is the 5% the confidence allows). One run and a loss-threshold attacker give a weak
bound: it shows a leak clearly without DP, and says little about how tight a small epsilon is.

Written here because no library we pin computes it; the formula is the paper's Algorithm 2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import binom
from torch.nn import functional

from fedtl.data.rows import LabelledImages
from fedtl.models.features import predict
from fedtl.reports.interpret import final_model
from fedtl.run_folder import FINAL_ACCURACY


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The chance of at least ``v`` right guesses out of ``r``, with ``m`` canaries, under (epsilon, delta)-DP."""
    if not 0 <= v <= r <= m or epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need 0 <= v <= r <= m, epsilon >= 0 and delta in [0, 1] (got m={m}, r={r}, v={v}, "
                         f"epsilon={epsilon}, delta={delta})")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomised response
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    # alpha = max over 1 <= i <= v of P[v - i <= Binomial(r, q) < v] / i: how far delta can move the tail.
    alpha = float(np.max(np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q)) / np.arange(1, v + 1))) if v else 0.0
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` right guesses of ``r`` refute at ``confidence``, given ``delta`` (0: none).

    ``p_value`` grows with epsilon; bisection finds where it crosses ``1 - confidence`` to 1e-6.
    """
    p = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
        if hi > 1e4:  # every guess right with vanishing delta: no epsilon explains it
            return math.inf
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < p else (lo, mid)
    return lo


def canary_losses(run_dir: Path, canaries: LabelledImages) -> torch.Tensor:
    """Each canary's cross-entropy on a run's released (final global) model."""
    logits = predict(final_model(run_dir), canaries)
    return functional.cross_entropy(logits, canaries.y.long(), reduction="none")


def split_guesses(guesses: int) -> tuple[int, int]:
    """``(k+, k-)``: how many canaries are guessed planted and not, out of ``guesses`` (the odd one: planted)."""
    return guesses - guesses // 2, guesses // 2


@dataclass(frozen=True)
class AuditResult:
    """One run's audit: its guesses, how many were right, and the epsilon they refute."""

    canaries: int
    planted: int
    guesses: int
    correct: int
    delta: float
    confidence: float
    epsilon_lower_bound: float
    # Area under the ROC curve of the loss as a planted/not score: 0.5 is chance (over every canary).
    auc: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit(losses: torch.Tensor, included: torch.Tensor, *, guesses: int, delta: float,
          confidence: float = 0.95) -> AuditResult:
    """Guess the coins from the canaries' ``losses`` (lowest ``k+``: planted; highest ``k-``: not) and bound epsilon.

    Parameters
    ----------
    losses : torch.Tensor
        Each canary's loss on the released model.
    included : torch.Tensor
        The coins (bool): which canaries were planted.
    guesses : int
        ``r``, fixed in advance (``split_guesses``): at most the number of canaries.
    delta : float
        The delta of the hypothesis refuted.
    confidence : float, default 0.95
    """
    m = len(losses)
    if not 0 < guesses <= m:
        raise ValueError(f"guesses = {guesses}: it must be between 1 and the number of canaries, {m}")
    k_in, k_out = split_guesses(guesses)
    order = torch.argsort(losses.double(), stable=True)
    right = int(included[order[:k_in]].sum()) + int((~included[order[m - k_out:]]).sum())
    return AuditResult(
        canaries=m, planted=int(included.sum()), guesses=guesses, correct=right, delta=delta, confidence=confidence,
        epsilon_lower_bound=epsilon_lower_bound(m, guesses, right, delta=delta, confidence=confidence),
        auc=_auc(-losses.double(), included))


def _auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Mann-Whitney AUC of ``scores`` for ``positive`` (ties count one half)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return math.nan
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + ties / 2)


TABLE_NOTE = ("The lower bound refutes (ε, δ)-DP for the canary client's data at {confidence:.0%} confidence: "
              "{guesses} guesses fixed in advance (half planted, half not) over {canaries} canaries, each planted "
              "with probability 1/2 (Steinke, Nasr and Jagielski's one-run audit, with its δ term), all fixed with the "
              "coins before the first run. The accounted ε is the accountant's upper bound for that client under "
              "the adjacency a canary flip is (DP-SGD: the canary added or removed; client-level DP: the canary "
              "client's update replaced, so replace-one, not the zero-out ε the noise is calibrated to); a lower "
              "bound above it is a leak, or a false alarm (chance at most {alarm:.0%} a level).")


def _eps(value: float | None) -> str:
    return "∞" if value is None or math.isinf(value) else f"{value:.3f}"


def audit_table(levels: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The audit's table: per level, the accounted epsilon beside the empirical lower bound."""
    header = ["target ε", "privacy", "adjacency", "accounted ε (upper)", "audit ε (lower, 95%)", "right / guesses", "AUC",
              "final accuracy", "refuted"]
    rows = [[_eps(float(r["epsilon"])), r["mode"], r.get("adjacency", "add-or-remove"), _eps(r["accounted_epsilon"]), _eps(r["epsilon_lower_bound"]),
             f"{r['correct']} / {r['guesses']}", f"{r['auc']:.3f}", f"{r[FINAL_ACCURACY]:.4f}",
             "yes" if r["refuted"] else "no"] for r in levels]
    return header, rows


def plot_audit(levels: list[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Accounted epsilon (upper bound) and the audit's lower bound, per level, as bars (log scale)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    x = np.arange(len(levels))
    upper = [r["accounted_epsilon"] if r["accounted_epsilon"] is not None and math.isfinite(r["accounted_epsilon"])
             else np.nan for r in levels]
    ax.bar(x - 0.2, upper, 0.4, label="accounted ε (upper bound)")
    ax.bar(x + 0.2, [r["epsilon_lower_bound"] for r in levels], 0.4, label="audit ε (lower bound, 95%)")
    ax.set_xticks(x, [f"ε = {_eps(float(r['epsilon']))}" for r in levels])
    ax.set_ylabel("epsilon")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    if title:
        ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
