"""FedNCM's round 0 (``finetune.head-init = "ncm"``): the head set from the clients' class means.

Before round one the server sends every connected node a ``HEAD_START`` query (the backbone
fingerprint, no tensor); each training node replies its per-class sums of L2-normalised
frozen features, its class counts and its sum of feature norms (``fedtl.models.ncm``). The
server checks every reply like a training update (shapes, finite values, counts that are
whole, non-negative and adding up to the examples it reports, and no class sum longer than
its count, which a sum of unit vectors cannot be), adds up the accepted ones and writes the nearest-class-mean classifier into the
head. The exchange is recorded as round 0's traffic; round 0's evaluation then measures the
head start, and training continues from it with the configured mode.
"""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedtl.errors import RoundFailedError
from fedtl.models.ncm import ncm_head
from fedtl.models.transfer import TransferModel
from fedtl.protocol import (
    CLASS_SUMS,
    CONFIG,
    COUNTS,
    FINGERPRINT,
    HEAD_START,
    METRICS,
    NORM_SUM,
    NUM_EXAMPLES,
    SERVER_ROUND,
    SUMS,
)
from fedtl.run_folder import BYTES_DOWN, BYTES_UP, CLIENTS_DECLINED, CLIENTS_FAILED, CLIENTS_OK
from fedtl.strategies.replies import content_key, examples_problem, reply_problem, triage
from fedtl.strategies.report import RoundReport
from fedtl.strategies.roster import TrainingNodes


def class_sums_problem(msg: Message, classes: int, dim: int) -> str | None:
    """Why a head-start reply cannot be added up, or ``None`` if it can."""
    spec = {SUMS: ((classes, dim), "float32"), COUNTS: ((classes,), "float32"), NORM_SUM: ((1,), "float32")}
    problem = reply_problem(msg, spec, record=CLASS_SUMS)
    if problem is not None:
        return problem
    arrays = msg.content[CLASS_SUMS]
    sums, counts, norm_sum = (arrays[k].numpy() for k in (SUMS, COUNTS, NORM_SUM))
    if (counts < 0).any() or (counts != np.round(counts)).any():
        return "class counts are not whole non-negative numbers"
    examples = msg.content[METRICS].get(NUM_EXAMPLES) if METRICS in msg.content.metric_records else None
    if examples is None or counts.sum() != examples:  # so the pooled counts hold at least one example
        return f"class counts add up to {counts.sum():g}, not the {NUM_EXAMPLES} it reports ({examples})"
    if norm_sum[0] < 0:
        return "the sum of feature norms is negative"
    # A sum of n unit vectors is at most n long: anything longer was not built from normalised features.
    if (np.linalg.norm(sums.astype(np.float64), axis=1) > counts * (1 + 1e-5) + 1e-6).any():
        return "a class sum is longer than its count of normalised features"
    return None


def head_start(grid: Grid, model: TransferModel, *, timeout: float, min_nodes: int,
               max_examples: float = float("inf")) -> RoundReport:
    """Ask every connected training node for its class sums and set ``model``'s head from the accepted ones.

    Waits, like a round, for ``min_nodes`` training nodes to connect (each is asked first, as training
    asks, whether it is held out and how many examples it holds). A reply may count no more examples
    than its node declared, nor than ``max_examples``.

    Returns
    -------
    RoundReport
        Round 0's traffic (nothing travels down; the class sums up), the nodes merged, and why any failed.

    Raises
    ------
    RoundFailedError
        If no node's class sums could be added up.
    """
    view = TrainingNodes(grid, timeout)
    _, nodes = sample_nodes(view, min_nodes, 0)
    config = ConfigRecord({FINGERPRINT: model.backbone_fingerprint, SERVER_ROUND: 0})
    queries = [Message(RecordDict({CONFIG: config}), dst_node_id=n, message_type=HEAD_START) for n in nodes]
    replies = list(grid.send_and_receive(queries, timeout=timeout))
    classes, dim = model.head.out_features, model.head.in_features
    found = triage(replies, nodes, lambda msg: class_sums_problem(msg, classes, dim) or examples_problem(
        msg, min(view.examples.get(msg.metadata.src_node_id, float("inf")), max_examples)))
    accepted, declined, problems = found.accepted, len(found.declined), found.problems
    for why in found.rejected:
        log(WARNING, "Head start: not adding the class sums of %s", why)
    if not accepted:
        raise RoundFailedError(f"head start (finetune.head-init = \"ncm\"): no node's class sums could be added up. "
                               f"{'; '.join(problems[:3]) or 'every node declined (held out of training, or its privacy gate said no)'}")
    accepted.sort(key=lambda m: content_key(m, CLASS_SUMS))  # sums in content order, not arrival: reproducible
    total = {k: sum(torch.from_numpy(m.content[CLASS_SUMS][k].numpy()).double() for m in accepted)
             for k in (SUMS, COUNTS, NORM_SUM)}
    weight, bias = ncm_head(total[SUMS], total[COUNTS], total[NORM_SUM])
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    log(INFO, "Head start: the head is the nearest-class-mean classifier of %d nodes' %d images",
        len(accepted), int(total[COUNTS].sum()))
    received = [m for m in replies if not m.has_error() and CLASS_SUMS in m.content.array_records]
    totals = {BYTES_DOWN: 0, BYTES_UP: sum(m.content[CLASS_SUMS].count_bytes() for m in received),
              CLIENTS_OK: len(accepted), CLIENTS_FAILED: len(nodes) - len(accepted) - declined,
              CLIENTS_DECLINED: declined}
    return RoundReport(0, totals, problems=problems)
