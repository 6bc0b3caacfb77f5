"""TransferStrategy: a Flower strategy wrapper that moves only what is trained.

Like Flower's DP wrappers, it holds a strategy and adds behaviour around it:
- each round's plan (units, learning rates, epochs) and the backbone fingerprint go
  into the training config;
- the ArrayRecord sent holds exactly this round's travelling keys; keys that join the
  set (gradual unfreezing) start from the server's pre-trained values;
- a reply is merged only if it carries exactly the tensors sent, with the same shapes
  and dtypes (those its bytes hold, not only those it declares) and finite values, no
  record the protocol lacks, finite metrics, and the metric names most replies carry
  (Flower would end the run on replies that differ), a weight (``num-examples``) no larger
  than the node declared or ``max_examples``, and tensors that moved a bounded distance from
  those sent (``max_update_ratio``); a dropped reply is recorded with its reason; a round in
  which no reply is merged stops the run; a round whose inner strategy merges none of the
  accepted replies (client-level DP short of a sampled reply, Bulyan short of replies)
  counts none as merged and says why;
- a client may decline to train (its privacy budget is spent): it is counted, not
  merged, and never sampled again; the run ends when too few clients are left to sample;
- the bytes sent and received are measured and reported to an observer, with LoRA's merge error
  (``merge_meter``: averaging A and B apart against the mean of the clients' B·A);
- under stacked LoRA (``stacking``), A and B are merged exactly and folded into the base weights,
  which go down with every message;
- normalisation statistics (running mean and variance) are averaged, not optimised, when
  the inner strategy steps a server optimiser (``statistics_by_mean``): a FedAdam step on
  a variance could make it negative;
- training samples only the nodes ``training_nodes`` shows (held-out clients stay out);
- after the final round every node evaluates the global model on its own test images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedtl.errors import RoundFailedError, RunStoppedError
from fedtl.protocol import (
    ACCURACY,
    ARRAYS,
    CLIENT_ACCURACY_MEAN,
    CONFIG,
    DECLINED,
    FINGERPRINT,
    HELD_OUT,
    METRICS,
    NODE_ID,
    NUM_EXAMPLES,
    PARTITION_ID,
    SERVER_ROUND,
    RoundPlan,
)
from fedtl.strategies.grids import FilteredGrid
from fedtl.strategies.lora import MergeMeter, Ranks
from fedtl.strategies.merge import as_sent, mean_statistics
from fedtl.strategies.nodes import TrainingNodes
from fedtl.strategies.replies import (
    Spec,
    content_key,
    declined_reason,
    examples_problem,
    reply_problem,
    triage,
    update_problem,
)
from fedtl.strategies.report import RoundObserver, bytes_up, round_report
from fedtl.strategies.stacking import Stacking
from fedtl.strategies.state import align_server_state


def _spec(record: ArrayRecord) -> Spec:
    return {k: (tuple(a.shape), a.dtype) for k, a in record.items()}


def _updates(replies: list[Message], weight_key: str) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """Each reply's tensors and its weight (its metric ``weight_key``), as the LoRA merges read them."""
    return ([{k: a.numpy() for k, a in m.content[ARRAYS].items()} for m in replies],
            [float(m.content[METRICS][weight_key]) for m in replies])


class TransferStrategy(Strategy):
    """Wrap ``inner`` so that it merges only the tensors each round trains.

    Parameters
    ----------
    inner : Strategy
        The Flower strategy that samples clients and aggregates.
    plan : Callable[[int], RoundPlan]
        The plan of each round (1-based).
    keys_of : Callable[[Iterable[str]], list[str]]
        State-dict keys of a set of units (``TransferModel.unit_keys``).
    initial_state : Mapping[str, torch.Tensor]
        Every unit's starting tensors (pre-trained blocks, new head), copied here: where
        a key that joins the travelling set starts.
    fingerprint : str
        Fingerprint of the pre-trained backbone; clients refuse to train on a mismatch.
    observer : RoundObserver, optional
        Called after each aggregation with the round's ``RoundReport``.
    final_round : int, optional
        After this round every node (held-out ones too) evaluates the model on its own
        test images; ``None``: no client evaluation.
    on_evaluate : Callable[[int, list[dict]], None], optional
        Called with the round and every node's evaluation metrics (with ``node-id``).
    training_nodes : Callable[[Grid], TrainingNodes], optional
        The view of the grid training samples from, which also holds what each node declared;
        default: all nodes, nothing declared.
    min_nodes : int, default 1
        Fewest nodes a round needs (the inner strategy's minimums); with fewer left to
        sample, the run stops rather than wait.
    statistics_by_mean : str, optional
        The reply metric to weight by (e.g. ``"num-examples"``) when BatchNorm statistics
        must be merged by the weighted mean whatever the inner rule; ``None``: by the inner rule.
    max_examples : float, default inf
        The most ``num-examples`` any reply may count (``strategy.max-examples``); a node the
        ``training_nodes`` view asked may count no more than it declared, either way.
    max_update_ratio : float, default 0
        Bound on how far each tensor may move (``replies.update_problem``); 0: unbounded.
    merge_meter : MergeMeter, optional
        Measures each round's LoRA merge error over the merged replies, into the round's report.
    stacking : Stacking, optional
        Merges LoRA's A and B by stacking (FLoRA) and folds them into the base weights, which then go
        down with every message (``protocol.BASE``); its own merge error replaces the meter's.
    ranks : Ranks, optional
        Clients at other LoRA ranks (HetLoRA): each node is sent the adapters cut to the rank it declared
        when asked, and its reply is zero-padded to the server's rank before merging.
    weight_key : str, default "num-examples"
        The reply metric the inner strategy weights by: the LoRA meter and stacking weight the same way.
    """

    def __init__(
        self, inner: Strategy, *, plan: Callable[[int], RoundPlan], keys_of: Callable[[Iterable[str]], list[str]],
        initial_state: Mapping[str, torch.Tensor], fingerprint: str, observer: RoundObserver | None = None,
        final_round: int | None = None, on_evaluate: Callable[[int, list[dict[str, Any]]], None] | None = None,
        training_nodes: Callable[[Grid], TrainingNodes] | None = None, min_nodes: int = 1,
        statistics_by_mean: str | None = None, max_examples: float = float("inf"), max_update_ratio: float = 0.0,
        merge_meter: MergeMeter | None = None, stacking: Stacking | None = None, ranks: Ranks | None = None,
        weight_key: str = NUM_EXAMPLES,
    ) -> None:
        self.inner = inner
        self.plan = plan
        self.keys_of = keys_of
        self.initial = {k: v.detach().cpu().numpy().copy() for k, v in initial_state.items()}
        self.fingerprint = fingerprint
        self.observer = observer
        self.final_round = final_round
        self.on_evaluate = on_evaluate
        self.training_nodes = training_nodes
        self.min_nodes = min_nodes
        self.statistics_by_mean = statistics_by_mean
        self.max_examples = max_examples
        self.max_update_ratio = max_update_ratio
        self.merge_meter = merge_meter
        self.stacking = stacking
        self.ranks = ranks
        self.weight_key = weight_key
        self.declined: dict[int, str] = {}  # node -> why it trains no more
        self._views: dict[int, TrainingNodes] = {}
        # round -> (arrays, destination nodes, bytes, folded base weights sent with them, what each node was sent
        # where it differs from the arrays: adapters cut to its rank)
        self._sent: dict[int, tuple[ArrayRecord, list[int], int, ArrayRecord | None, dict[int, ArrayRecord]]] = {}

    def summary(self) -> None:
        log(INFO, "\t├──> TransferStrategy: only travelling tensors are sent and merged")
        self.inner.summary()

    def travelling_arrays(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The ArrayRecord of round ``server_round``: current values, new keys from ``initial_state``."""
        out = ArrayRecord()
        for k in self.keys_of(self.plan(server_round).lrs):
            out[k] = arrays[k] if k in arrays else Array(np.ascontiguousarray(self.initial[k]))
        return out

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """``config`` with the round's plan and the backbone fingerprint: what every instruction carries."""
        return ConfigRecord({**config, **self.plan(server_round).to_config(), FINGERPRINT: self.fingerprint})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        record = self.travelling_arrays(server_round, arrays)
        cfg = self.round_config(server_round, config)
        if self.training_nodes is not None:
            grid = self._views.setdefault(id(grid), self.training_nodes(grid))  # one view (and its answers) per grid
        if self.declined:
            grid = FilteredGrid(grid, lambda ids: [n for n in ids if n not in self.declined])
            left = len(list(grid.get_node_ids()))
            if left < self.min_nodes:  # Flower would wait for them forever
                raise RunStoppedError(
                    f"round {server_round}: {left} client(s) can still train, fewer than the {self.min_nodes} a round "
                    f"needs; {len(self.declined)} declined for good ({next(reversed(self.declined.values()))})")
        align_server_state(self.inner, record)  # keys that join (gradual unfreezing) start fresh
        messages = list(self.inner.configure_train(server_round, record, cfg, grid))
        base = self._with_base(messages, arrays)
        cut = self._cut_to_ranks(messages, record)
        self._sent[server_round] = (record, [m.metadata.dst_node_id for m in messages],
                                    sum(r.count_bytes() for m in messages for r in m.content.array_records.values()),
                                    base, cut)
        return messages

    def _cut_to_ranks(self, messages: list[Message], record: ArrayRecord) -> dict[int, ArrayRecord]:
        """``Ranks.cut_messages`` at the ranks the nodes declared (none without ``ranks``)."""
        if self.ranks is None:
            return {}
        return self.ranks.cut_messages(messages, record,
                                       {n: r for view in self._views.values() for n, r in view.ranks.items()})

    def _with_base(self, messages: list[Message], arrays: ArrayRecord) -> ArrayRecord | None:
        """``Stacking.add_base`` under stacking; else ``None``."""
        return None if self.stacking is None else self.stacking.add_base(messages, arrays)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        record, sent_to, bytes_down, base, cut = self._sent.pop(server_round)
        spec = _spec(record)
        sent = len(sent_to)

        def problem(msg: Message) -> str | None:
            mine = cut.get(msg.metadata.src_node_id, record)  # what this node was sent
            return self._problem(msg, mine, spec if mine is record else _spec(mine))

        found = triage(replies, sent_to, problem, same_metrics=True)
        accepted, declined, problems = found.accepted, found.declined, found.problems
        for msg in declined:
            self.declined[msg.metadata.src_node_id] = reason = str(declined_reason(msg))
            log(INFO, "Round %s: node %s declines, and is not sampled again: %s", server_round,
                msg.metadata.src_node_id, reason)
        for why in found.rejected:
            log(WARNING, "Round %s: not merging the update of %s", server_round, why)
        for why in found.silent:
            log(WARNING, "Round %s: %s", server_round, why)

        def report(merged: list[Message], metrics: MetricRecord | None, unanswered: bool = True,
                   received: int | None = None, errors: dict[str, float] | None = None) -> None:
            if self.observer is not None:
                self.observer(round_report(server_round, replies, merged, len(declined), sent, bytes_down, metrics,
                                           problems, self._unanswered(sent_to, replies) if unanswered else None,
                                           received, errors))

        if declined and len(declined) == sent:  # nothing to merge, nothing failed: the model stays as it is
            report([], None, unanswered=False)
            return None, None
        if sent and not accepted:
            report([], None)  # what the nodes spent is recorded before the run ends
            reasons = "; ".join(problems[:3]) or f"no replies within the round timeout ({sent} sent)"
            raise RoundFailedError(f"round {server_round}: no client update could be merged. {reasons}")
        # Float sums depend on their order, and replies arrive (and Flower samples nodes) in
        # random order: merging in content order makes a run with a given seed reproducible.
        accepted.sort(key=content_key)
        received = bytes_up(replies)  # as they came, before any padding
        if self.ranks is not None:  # HetLoRA: every reply at the server's rank, zeros beyond the node's own
            for msg in accepted:
                msg.content[ARRAYS] = self.ranks.pad(msg.content[ARRAYS])
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        if arrays is None:  # the inner strategy declined to merge: no update counts as merged
            problems.append(
                f"round {server_round} merged nothing: {type(self.inner).__name__} declined all {len(accepted)} "
                "accepted updates, the model is unchanged (a client-level DP wrapper releases a round only with "
                "every sampled client's update; Bulyan needs 4 x num-malicious-nodes + 3; see flower.log)")
            log(WARNING, "Round %s: %s", server_round, problems[-1])
            accepted = []
        if arrays is not None and self.statistics_by_mean is not None:
            arrays = mean_statistics(arrays, accepted, self.statistics_by_mean)
        if arrays is not None:
            arrays = as_sent(arrays, spec)
        errors: dict[str, float] = {}
        if arrays is not None and self.stacking is not None and base is not None:
            arrays, errors = self.stacking.fold(server_round, arrays, *_updates(accepted, self.weight_key), base)
        elif self.merge_meter and accepted:
            errors = self.merge_meter(*_updates(accepted, self.weight_key))
        report(accepted, metrics, received=received, errors=errors)
        return arrays, metrics

    def _problem(self, msg: Message, sent: ArrayRecord, spec: Spec) -> str | None:
        """Why the training reply ``msg`` to ``sent`` cannot be merged, or ``None``."""
        node = msg.metadata.src_node_id
        if (problem := reply_problem(msg, spec)) is not None:
            return problem
        if any(view.uncounted(node) for view in self._views.values()):
            return "its node declared no training examples when asked (it could not read its data then; it is " \
                   "asked again next round)"
        declared = self._declared.get(node, float("inf"))
        return examples_problem(msg, min(declared, self.max_examples)) or (
            update_problem(msg, sent, self.max_update_ratio) if self.max_update_ratio else None)

    @property
    def _declared(self) -> dict[int, int]:
        """Node -> the training examples it declared, from every view of the grid that asked."""
        return {n: e for view in self._views.values() for n, e in view.examples.items()}

    def _unanswered(self, sent_to: list[int], replies: list[Message]) -> list[dict[str, int]]:
        """``RoundReport.unanswered``: the nodes of ``sent_to`` with no reply in ``replies`` but an error."""
        answered = {m.metadata.src_node_id for m in replies if not m.has_error()}
        declared = self._declared
        partitions = {n: p for view in self._views.values() for n, p in view.partitions.items()}
        return [{NODE_ID: n, **({PARTITION_ID: partitions[n]} if n in partitions else {}),
                 **({NUM_EXAMPLES: declared[n]} if n in declared else {})}
                for n in sorted(set(sent_to) - answered)]

    def start(  # type: ignore[override]
        self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
        train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None, *, first_round: int = 1,
        after_round: Callable[[int, ArrayRecord], None] | None = None,
    ) -> Result:
        """Flower's ``Strategy.start``, from round ``first_round`` (a resumed run: ``initial_arrays`` are the
        global arrays after round ``first_round - 1``, evaluated then already), and ``after_round`` called
        with each round and its global arrays once the round has ended (the resume checkpoint).

        Flower 1.42's loop always starts at round 1; this is its loop with a first round, hence the override.
        """
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        log(INFO, "Starting %s strategy from round %s of %s:", type(self).__name__, first_round, num_rounds)
        self.summary()
        result = Result()
        if evaluate_fn and first_round == 1:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        arrays = initial_arrays
        for rnd in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", rnd, num_rounds)
            replies = grid.send_and_receive(self.configure_train(rnd, arrays, train_config, grid), timeout=timeout)
            merged, metrics = self.aggregate_train(rnd, replies)
            if merged is not None:
                result.arrays = arrays = merged
            if metrics is not None:
                result.train_metrics_clientapp[rnd] = metrics
            evaluated = grid.send_and_receive(self.configure_evaluate(rnd, arrays, evaluate_config, grid),
                                              timeout=timeout)
            client_metrics = self.aggregate_evaluate(rnd, evaluated)
            if client_metrics is not None:
                result.evaluate_metrics_clientapp[rnd] = client_metrics
            if evaluate_fn:
                res = evaluate_fn(rnd, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
            if after_round is not None:
                after_round(rnd, arrays)
        return result

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """After the final round, the global model to every node for evaluation on its own test images."""
        if server_round != self.final_round:
            return []
        content = ConfigRecord({**self.round_config(server_round, config), SERVER_ROUND: server_round})
        record = self.travelling_arrays(server_round, arrays)
        messages = [Message(RecordDict({ARRAYS: record, CONFIG: content}), dst_node_id=node,
                            message_type=MessageType.EVALUATE) for node in grid.get_node_ids()]
        self._with_base(messages, arrays)
        self._cut_to_ranks(messages, record)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        clients = [{NODE_ID: m.metadata.src_node_id, **dict(m.content[METRICS]),
                    **({DECLINED: why} if (why := declined_reason(m)) is not None else {})}  # its gate said no
                   for m in replies if not m.has_error() and METRICS in m.content.metric_records]
        if self.on_evaluate is not None:
            self.on_evaluate(server_round, clients)
        scored = [c[ACCURACY] for c in clients if ACCURACY in c and not c.get(HELD_OUT)]
        return MetricRecord({CLIENT_ACCURACY_MEAN: float(np.mean(scored))}) if scored else None
