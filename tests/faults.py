"""Faulty and hostile clients for the end-to-end tests: Flower mods that corrupt one node's replies.

Each mod acts only on the node of partition 0 and only on training replies; every other node is
the honest fedtl client. They are module-level functions because Ray pickles them into its actors.
"""

from __future__ import annotations

import os
import time

import numpy as np
from flwr.app import Array, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedtl.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, PARTITION_ID, SERVER_ROUND


def _is_target(msg: Message, context: Context) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and context.node_config.get(PARTITION_ID) == 0


def scaled_update(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Partition 0 replies its update times 1e6 (a model-replacement attack)."""
    reply = call_next(msg, context)
    if _is_target(msg, context) and not reply.has_error():
        sent, arrays = msg.content[ARRAYS], reply.content[ARRAYS]
        for key in list(arrays.keys()):
            old, new = sent[key].numpy(), arrays[key].numpy()
            if new.dtype.kind == "f":
                arrays[key] = Array((old + 1e6 * (new - old)).astype(new.dtype))
    return reply


def inflated_examples(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Partition 0 claims 1e12 examples: its update would take over the weighted mean."""
    reply = call_next(msg, context)
    if _is_target(msg, context) and not reply.has_error():
        reply.content[METRICS][NUM_EXAMPLES] = 10**12
    return reply


def half_float_max(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Partition 0 replies every value as float32-max / 2: finite, so no NaN check catches it."""
    reply = call_next(msg, context)
    if _is_target(msg, context) and not reply.has_error():
        arrays = reply.content[ARRAYS]
        for key in list(arrays.keys()):
            a = arrays[key].numpy()
            if a.dtype.kind == "f":
                arrays[key] = Array(np.full_like(a, np.finfo(np.float32).max / 2))
    return reply


def dies(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Partition 0's process ends abruptly in round 2 (a crash, an OOM kill)."""
    if _is_target(msg, context) and msg.content[CONFIG][SERVER_ROUND] == 2:
        os._exit(1)
    return call_next(msg, context)


def hangs(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Partition 0 never answers in round 2 (a stuck process)."""
    if _is_target(msg, context) and msg.content[CONFIG][SERVER_ROUND] == 2:
        time.sleep(3600)
    return call_next(msg, context)
