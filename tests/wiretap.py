"""A Flower mod for the end-to-end tests that writes down what actually crosses the wire: the array keys
of every training message a node receives and of its reply, one JSON line each, to the file named by
``$FEDTL_WIRETAP`` (Ray's actors inherit the driver's environment). Module-level: Ray pickles it."""

from __future__ import annotations

import json
import os

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedtl.protocol import ARRAYS, PARTITION_ID

ENV = "FEDTL_WIRETAP"


def _keys(msg: Message) -> list[str]:
    return sorted(msg.content[ARRAYS].keys()) if not msg.has_error() and ARRAYS in msg.content.array_records else []


def wiretap(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN:
        with open(os.environ[ENV], "a") as f:
            for direction, m in (("down", msg), ("up", reply)):
                f.write(json.dumps({"partition": context.node_config.get(PARTITION_ID), "direction": direction,
                                    "keys": _keys(m)}) + "\n")
    return reply
