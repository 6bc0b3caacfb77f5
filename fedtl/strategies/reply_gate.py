"""``ReplyGate``: a training reply is merged only if it is what was asked for, and a round that merges
nothing says why.

A reply is merged only if it carries exactly the tensors its node was sent, with the same shapes and
dtypes (those its bytes hold, not only those it declares) and finite values, no record the protocol
lacks, finite metrics, and the metric names most replies carry (Flower would end the run on replies
that differ), a weight (``num-examples``) no larger than the node declared or ``max_examples``, and
tensors that moved a bounded distance from those sent (``max_update_ratio``). A dropped reply is
logged with its reason; a round in which no reply is merged stops the run; a round whose inner strategy
merges none of the accepted replies counts none as merged and says why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtl.errors import RoundFailedError
from fedtl.protocol import ARRAYS
from fedtl.strategies.exchange import Exchanges
from fedtl.strategies.replies import (
    Sent,
    content_key,
    declined_reason,
    examples_problem,
    reply_problem,
    sent_values,
    spec_of,
    triage,
    update_problem,
)
from fedtl.strategies.roster import Roster
from fedtl.strategies.wrapper import StrategyWrapper
from fedtl.wire import checked


class ReplyGate(StrategyWrapper):
    """Merge only the training replies that can be merged; record in the round's ``Exchange`` what each
    node was sent, which replies were merged and why the others were not.

    Parameters
    ----------
    strategy : Strategy
        The strategy wrapped.
    roster : Roster
        What each node declared (its count of training examples).
    exchanges : Exchanges
        The run's round records.
    max_examples : float, default inf
        The most ``num-examples`` any reply may count (``strategy.max-examples``); a node the roster asked
        may count no more than it declared, either way.
    max_update_ratio : float, default 0
        Bound on how far each tensor may move (``replies.update_problem``); 0: unbounded.
    """

    behaviour = "merges only replies that carry what was sent"

    def __init__(self, strategy: Strategy, *, roster: Roster, exchanges: Exchanges,
                 max_examples: float = float("inf"), max_update_ratio: float = 0.0) -> None:
        super().__init__(strategy)
        if not max_examples > 0:
            raise ValueError(f"max_examples must be positive, got {max_examples}")
        if max_update_ratio < 0:
            raise ValueError(f"max_update_ratio must be 0 (unbounded) or positive, got {max_update_ratio}")
        self.roster, self.exchanges = roster, exchanges
        self.max_examples, self.max_update_ratio = max_examples, max_update_ratio

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.exchanges.of(server_round).sent = {m.metadata.dst_node_id: m.content[ARRAYS] for m in messages}
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        exchange = self.exchanges.of(server_round)
        found = triage(replies, exchange.sent, self._problem_of(exchange.sent), same_metrics=True)
        exchange.declined, exchange.problems = len(found.declined), found.problems
        for msg in found.declined:  # its privacy budget is spent: counted, not merged, never sampled again
            self.roster.decline(msg.metadata.src_node_id, reason := str(declined_reason(msg)))
            log(INFO, "Round %s: node %s declines, and is not sampled again: %s", server_round,
                msg.metadata.src_node_id, reason)
        for why in found.rejected:
            log(WARNING, "Round %s: not merging the update of %s", server_round, why)
        for why in found.silent:
            log(WARNING, "Round %s: %s", server_round, why)
        if found.declined and len(found.declined) == len(exchange.sent):
            exchange.all_declined = True  # nothing to merge, nothing failed: the model stays as it is
            return None, None
        if exchange.sent and not found.accepted:
            reasons = "; ".join(exchange.problems[:3]) or f"no replies within the round timeout ({len(exchange.sent)} sent)"
            raise RoundFailedError(f"round {server_round}: no client update could be merged. {reasons}")
        # Float sums depend on their order, and replies arrive (and Flower samples nodes) in
        # random order: merging in content order makes a run with a given seed reproducible.
        accepted = sorted(found.accepted, key=content_key)
        for msg in accepted:  # read again by the merge, without numpy's header parse (fedtl.wire)
            msg.content[ARRAYS] = checked(msg.content[ARRAYS])
        arrays, metrics = self.strategy.aggregate_train(server_round, accepted)
        if arrays is None:  # the inner strategy declined to merge: no update counts as merged
            exchange.problems.append(
                f"round {server_round} merged nothing: {type(self.strategy).__name__} declined all {len(accepted)} "
                "accepted updates, the model is unchanged (its own warning in flower.log says why)")
            log(WARNING, "Round %s: %s", server_round, exchange.problems[-1])
            accepted = []
        exchange.merged = accepted
        return arrays, metrics

    def _problem_of(self, sent: dict[int, ArrayRecord]) -> Callable[[Message], str | None]:
        declared = self.roster.examples
        decoded: dict[int, Sent] = {}  # id of a sent record -> its tensors, decoded once for all its replies

        def problem(msg: Message) -> str | None:
            """Why the training reply ``msg`` cannot be merged, or ``None``."""
            node = msg.metadata.src_node_id
            mine = sent.get(node)
            if mine is None:
                return "its node was not sent this round's training"
            if (why := reply_problem(msg, spec_of(mine))) is not None:
                return why
            if self.roster.uncounted(node):
                return "its node declared no training examples when asked (it could not read its data then; " \
                       "it is asked again next round)"
            if (why := examples_problem(msg, min(declared.get(node, float("inf")), self.max_examples))) is not None:
                return why
            if not self.max_update_ratio:
                return None
            if id(mine) not in decoded:
                decoded[id(mine)] = sent_values(mine)
            return update_problem(msg, decoded[id(mine)], self.max_update_ratio)

        return problem
