"""The transfer strategy: a Flower strategy inside the wrappers that fine-tuning needs, composed in one place.

Each wrapper adds one behaviour and delegates the rest (``fedtl.strategies.wrapper``); their order is
what makes them work together, so it is written once, here. Outermost first:

- ``RoundReporting``: what each round exchanged, to the run's records (bytes counted as sent and received);
- ``ReplyGate``: a reply is merged only if it carries what its node was sent, within the limits (and a node
  that declines is not sampled again);
- ``StackedLora`` or ``MeasuredMerge``: LoRA's exact stacked merge, or the merge error of averaging A and B;
- ``TravellingKeys``: only the round's travelling tensors go down, with the plan and the fingerprint;
- ``LoraRanks``: each node at its own LoRA rank (HetLoRA), which it declares when first sampled;
- ``NodeSampling``: training samples only nodes that may train (not held out, not declined for good), asking
  a node what it holds when it is first sampled;
- ``StatisticsByMean``: normalisation statistics averaged, not stepped by a server optimiser;
- ``FinalEvaluation``: every node evaluates after the final round;
- the Flower strategy (inside its privacy mode's wrapper, if any).

``transfer_strategy`` composes them from one parameter object per behaviour; ``run_strategy`` in
``fedtl.strategies.factory`` builds those from a run's config and model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from flwr.serverapp.strategy import Strategy

from fedtl.protocol import NUM_EXAMPLES, RoundPlan
from fedtl.strategies.evaluation import ClientEvaluations, FinalEvaluation
from fedtl.strategies.exchange import Exchanges
from fedtl.strategies.lora import MergeMeter, Ranks
from fedtl.strategies.lora_merging import LoraRanks, MeasuredMerge, StackedLora
from fedtl.strategies.merge import StatisticsByMean
from fedtl.strategies.reply_gate import ReplyGate
from fedtl.strategies.report import RoundObserver, RoundReporting
from fedtl.strategies.roster import Roster
from fedtl.strategies.sampling import NodeSampling
from fedtl.strategies.stacking import Stacking
from fedtl.strategies.travelling import TravellingKeys


@dataclass(frozen=True)
class Travel:
    """What travels each round (``TravellingKeys``): the plan, the keys of its units, where new keys start,
    and the backbone's fingerprint."""

    plan: Callable[[int], RoundPlan]
    keys_of: Callable[[Iterable[str]], list[str]]
    initial_state: Mapping[str, torch.Tensor]
    fingerprint: str


@dataclass(frozen=True)
class Sampling:
    """How many nodes a round trains (``NodeSampling``): at least ``min_nodes`` (fewer left to sample: the run
    stops rather than wait), at most ``most`` (the config's ``sampled_clients``; ``None``: as sampled); ``seed``:
    each round samples from it and the round (``None``: from Python's ``random`` as it stands)."""

    min_nodes: int = 1
    most: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class ReplyLimits:
    """The gate's limits (``ReplyGate``): ``strategy.max-examples`` (inf: none) and ``strategy.max-update-ratio``
    (0: unbounded)."""

    max_examples: float = float("inf")
    max_update_ratio: float = 0.0


@dataclass(frozen=True)
class LoraMerging:
    """How LoRA's adapters are merged: stacked and folded (``stacking``), at each node's rank (``ranks``), or
    averaged with the merge error measured (``meter``); ``weight_key``: the reply metric the merge weights by."""

    stacking: Stacking | None = None
    ranks: Ranks | None = None
    meter: MergeMeter | None = None
    weight_key: str = NUM_EXAMPLES


@dataclass(frozen=True)
class Records:
    """Where the run's records go: each round's ``RoundReport`` (``observer``), and the nodes' evaluation after
    ``final_round`` (``on_evaluate``; ``final_round = None``: no client evaluation) by every node, or by a sample of
    ``evaluate_clients`` drawn from ``seed`` when there are more (``FinalEvaluation``)."""

    observer: RoundObserver | None = None
    final_round: int | None = None
    on_evaluate: ClientEvaluations | None = None
    evaluate_clients: int = 0
    seed: int = 0


def transfer_strategy(inner: Strategy, travel: Travel, *, roster: Roster | None = None,
                      sampling: Sampling = Sampling(), limits: ReplyLimits = ReplyLimits(),
                      lora: LoraMerging = LoraMerging(), statistics_by_mean: str | None = None,
                      records: Records = Records()) -> Strategy:
    """``inner`` inside the wrappers of fine-tuning, in their order (the module's docstring).

    Parameters
    ----------
    inner : Strategy
        The Flower strategy that samples clients and merges.
    travel : Travel
        What travels each round.
    roster : Roster, optional
        The run's nodes: default, nodes are not asked (every node trains, nothing is declared).
    sampling : Sampling
        The fewest and the most nodes a round trains.
    limits : ReplyLimits
        The gate's limits on a reply.
    lora : LoraMerging
        How LoRA's adapters are merged.
    statistics_by_mean : str, optional
        The reply metric to weight normalisation statistics by, when they must be averaged whatever the inner
        rule (a server optimiser); ``None``: by the inner rule.
    records : Records
        Where the run's records go.
    """
    roster = roster or Roster()
    exchanges = Exchanges()
    s = FinalEvaluation(inner, final_round=records.final_round, on_evaluate=records.on_evaluate,
                        sample=records.evaluate_clients, seed=records.seed)
    if statistics_by_mean is not None:
        s = StatisticsByMean(s, weight_key=statistics_by_mean)
    # Inside LoraRanks: the round's nodes are settled (and their ranks known) before the rank cut.
    s = NodeSampling(s, roster=roster, min_nodes=sampling.min_nodes, most=sampling.most, seed=sampling.seed)
    if lora.ranks is not None:
        s = LoraRanks(s, ranks=lora.ranks, roster=roster)
    s = TravellingKeys(s, plan=travel.plan, keys_of=travel.keys_of, initial_state=travel.initial_state,
                       fingerprint=travel.fingerprint)
    if lora.stacking is not None:
        s = StackedLora(s, stacking=lora.stacking, exchanges=exchanges, weight_key=lora.weight_key)
    elif lora.meter:
        s = MeasuredMerge(s, meter=lora.meter, exchanges=exchanges, weight_key=lora.weight_key)
    s = ReplyGate(s, roster=roster, exchanges=exchanges, max_examples=limits.max_examples,
                  max_update_ratio=limits.max_update_ratio)
    return RoundReporting(s, observer=records.observer or (lambda report: None), exchanges=exchanges, roster=roster)
