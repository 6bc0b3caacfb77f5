"""What a reply must be before any Flower code merges it: the checks both the rounds and the head start run.

A reply is judged against what was sent (every tensor's key, shape and dtype, also as its bytes hold
it) and against the protocol (its records, finite metrics, a weight that counts at least one example
and no more than the node may claim, tensors that moved a bounded distance from what was sent).
Across a round, replies must carry the same metric names: Flower's strategies refuse a round whose
replies differ, ending the run without naming the node, so the odd ones are dropped here instead.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from fedtl.protocol import ARRAYS, DECLINED, METRICS, NUM_EXAMPLES, REASON, UNIT_WEIGHT
from fedtl.wire import array_values

# key -> (shape, dtype) of every tensor that was sent
Spec = dict[str, tuple[tuple[int, ...], str]]


def spec_of(record: ArrayRecord) -> Spec:
    """The shape and dtype of every tensor of ``record``."""
    return {k: (tuple(a.shape), a.dtype) for k, a in record.items()}


def declined_reason(msg: Message) -> str | None:
    """The reason a reply declines the round, or ``None`` if it does not."""
    if msg.has_error() or DECLINED not in msg.content.config_records:
        return None
    return str(msg.content.config_records[DECLINED].get(REASON, "no reason given"))


def reply_problem(msg: Message, expected: Spec, record: str = ARRAYS) -> str | None:
    """Why the reply ``msg`` cannot be merged, or ``None`` if it can.

    Parameters
    ----------
    msg : Message
        A reply to a training message.
    expected : dict
        Key -> (shape, dtype) of every tensor that was sent.
    record : str, default ``ARRAYS``
        The name of the reply's ArrayRecord that holds them.
    """
    if msg.has_error():
        # Simulation wraps the client's exception in Ray's traceback; its last line says what happened.
        lines = [line.strip() for line in msg.error.reason.splitlines() if line.strip()]
        return f"error reply: {(lines[-1] if lines else msg.error.reason)[:300]}"
    if record not in msg.content.array_records:
        return f"no {record!r} ArrayRecord in the reply"
    content = msg.content
    unexpected = sorted({*content.array_records} - {record}) + sorted({*content.metric_records} - {METRICS}) \
        + sorted(content.config_records)
    if unexpected:
        return f"records the protocol does not have: {unexpected[:5]}"
    metrics = dict(content[METRICS]) if METRICS in content.metric_records else {}
    for name, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return f"metric {name!r} is {str(value)[:40]}, not a finite number"
    examples = metrics.get(NUM_EXAMPLES, 1)
    if not (isinstance(examples, (int, float)) and examples >= 1 and examples == int(examples)):
        return f"{NUM_EXAMPLES} is {examples}: a weight must count at least one example"  # -24 would cancel others
    if metrics.get(UNIT_WEIGHT, 1) != 1:  # equal weights are what client-level DP's noise is scaled to
        return f"{UNIT_WEIGHT} is {metrics[UNIT_WEIGHT]}: a unit weight is 1"
    arrays = msg.content[record]
    got = set(arrays.keys())
    if got != set(expected):
        return f"keys differ: missing {sorted(set(expected) - got)[:5]}, unexpected {sorted(got - set(expected))[:5]}"
    for key, (shape, dtype) in expected.items():
        a = arrays[key]
        if tuple(a.shape) != shape or a.dtype != dtype:
            return f"{key} is {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}"
        try:
            values = array_values(a, shape, dtype)
        except (TypeError, ValueError, EOFError) as err:  # another serialisation, or bytes that are no array
            return f"{key} cannot be read as an array ({type(err).__name__}: {str(err)[:100]})"
        # An Array's declared shape and dtype are metadata beside its bytes: check what the bytes hold.
        if values.shape != shape or str(values.dtype) != dtype:
            return f"{key} holds {values.dtype}{list(values.shape)}, declared {a.dtype}{list(a.shape)}"
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"{key} holds NaN or infinite values"
    return None


def examples_problem(msg: Message, most: float) -> str | None:
    """Why the reply's ``num-examples`` (its weight) is more than it may be, ``most``, or ``None``.

    ``most`` is what the node declared when the run began (its training set's size) or
    ``strategy.max-examples``, the smaller: one node claiming 1e12 would take over the mean.
    """
    examples = msg.content[METRICS].get(NUM_EXAMPLES, 1) if METRICS in msg.content.metric_records else 1
    if examples > most:
        return f"{NUM_EXAMPLES} is {examples:g}, more than the {most:g} it may count (its declared training " \
               "examples, or strategy.max-examples)"
    return None


# key -> (the sent tensor in float64, its root mean square, its dtype): what ``update_problem`` measures a reply against
Sent = dict[str, tuple[np.ndarray, float, str]]


def sent_values(sent: ArrayRecord) -> Sent:
    """The floating-point tensors of ``sent`` that ``update_problem`` bounds, decoded once for every reply."""
    out = {}
    for key, a in sent.items():
        before = a.numpy()
        if before.dtype.kind == "f" and before.size > 0:
            wide = before.astype(np.float64)
            out[key] = (wide, float(np.sqrt(np.mean(wide**2))), str(before.dtype))
    return out


def update_problem(msg: Message, sent: Sent, ratio: float) -> str | None:
    """Why the reply's tensors moved too far from those ``sent`` (``sent_values``), or ``None``; the reply's
    tensors are those ``reply_problem`` checked.

    A tensor may move by a root mean square per value of at most ``ratio`` × (the sent tensor's own
    RMS + 1): scale-free for trained weights, and still room for a zero-initialised one (a LoRA B) to
    grow. ``strategy.max-update-ratio`` (default 100) is far above any fine-tuning step; an update
    scaled ×1e6, or values near the float32 maximum, are far above it.
    """
    arrays = msg.content[ARRAYS]
    for key, (before, scale, dtype) in sent.items():
        after = array_values(arrays[key], before.shape, dtype)
        moved = float(np.sqrt(np.mean((after.astype(np.float64) - before) ** 2)))
        if not moved <= ratio * (scale + 1.0):
            return f"{key} moved by {moved:.3g} per value (root mean square), over the bound {ratio * (scale + 1):.3g}" \
                   f" = strategy.max-update-ratio {ratio:g} × (its RMS {scale:.3g} + 1)"
    return None


def consistent(replies: list[Message]) -> tuple[list[Message], list[tuple[Message, str]]]:
    """The replies whose metric names are those most replies carry, and why each other one is left out.

    Flower's strategies refuse a round whose replies carry different metrics (``InconsistentMessageReplies``,
    which ends the run without naming the node): the odd ones are dropped instead, like a bad update.
    Ties go to the larger set, then the first in name order, so the choice does not depend on arrival.
    """
    names = [frozenset(m.content[METRICS].keys()) if METRICS in m.content.metric_records else frozenset()
             for m in replies]
    if len(set(names)) <= 1:
        return replies, []
    common = max(set(names), key=lambda n: (names.count(n), len(n), sorted(n)))
    kept, dropped = [], []
    for msg, n in zip(replies, names, strict=True):
        if n == common:
            kept.append(msg)
        else:
            dropped.append((msg, f"its metrics differ from the other replies': missing {sorted(common - n)[:5]}, "
                                 f"unexpected {sorted(n - common)[:5]}"))
    return kept, dropped


@dataclass
class Triage:
    """A round's replies sorted: those that may be merged, those that decline, and why no other can be used."""

    accepted: list[Message] = field(default_factory=list)
    declined: list[Message] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # "node <id>: why", a reply that came but cannot be used
    silent: list[str] = field(default_factory=list)  # "node <id>: no reply ...", a node sent to that did not reply

    @property
    def problems(self) -> list[str]:
        """Every reason a node's reply is missing from the merge (the round's ``client_errors``)."""
        return self.rejected + self.silent


def triage(replies: list[Message], sent_to: Iterable[int], problem: Callable[[Message], str | None], *,
           same_metrics: bool = False) -> Triage:
    """Sort ``replies`` to the nodes ``sent_to``: declined, or usable unless ``problem`` names why not; with
    ``same_metrics``, those whose metric names differ from most replies' are rejected too (``consistent``)."""
    out = Triage()
    for msg in replies:
        if declined_reason(msg) is not None:
            out.declined.append(msg)
        elif (why := problem(msg)) is None:
            out.accepted.append(msg)
        else:
            out.rejected.append(f"node {msg.metadata.src_node_id}: {why}")
    if same_metrics:
        out.accepted, odd = consistent(out.accepted)
        out.rejected += [f"node {msg.metadata.src_node_id}: {why}" for msg, why in odd]
    out.silent = [f"node {node}: no reply within the round timeout (stopped, or disconnected?)"
                  for node in sorted(set(sent_to) - {m.metadata.src_node_id for m in replies})]
    return out


def content_key(msg: Message, record: str = ARRAYS) -> str:
    """A key of a reply's tensors (its ArrayRecord ``record``), for ordering replies by content rather than arrival."""
    arrays = msg.content[record]
    h = hashlib.sha256()
    for key in sorted(arrays.keys()):
        h.update(key.encode())
        h.update(arrays[key].data)
    return h.hexdigest()
