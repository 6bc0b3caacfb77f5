"""The wire contract: every name one side writes and the other reads, and the round's plan.

The ServerApp and the ClientApps run on different machines and share only this module
(and the config, the models and the data). Anything that travels in a Flower message
(record names, reply-metric names, round-config keys, the plan's encoding), every key of
a node's ``--node-config`` and every key of a node's ``context.state`` is named here once;
a literal copy of one of these strings anywhere else is a bug.

Like Flower's ``common/differential_privacy_constants.py``: constants and a plain
dataclass, no torch, no Flower, so that either side (and ``fedtl deploy``) imports it cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

# -- units ---------------------------------------------------------------------------
HEAD = "head"
"""The classification head: a unit on the wire, next to the backbone's block names."""

# -- records of a message (Flower's own default names for a strategy's records) -------------
ARRAYS = "arrays"  # ArrayRecord: the travelling tensors, both ways
# ArrayRecord, server to client only: frozen tensors the server has changed (stacked LoRA's folded base
# weights), loaded before the travelling ones and never sent back.
BASE = "base"
CONFIG = "config"  # ConfigRecord: the round's config (plan, fingerprint, server round)
METRICS = "metrics"  # MetricRecord: a reply's metrics
DECLINED = "declined"  # ConfigRecord in a reply that declines the round ...
REASON = "reason"  # ... with its reason

# -- the head start (``finetune.head-init = "ncm"``): a query before round one, and its reply ------
HEAD_START = "query.class_means"  # the message type (a Flower query with its own action)
CLASS_SUMS = "class-sums"  # ArrayRecord of the reply ...
SUMS, COUNTS, NORM_SUM = "sums", "counts", "norm-sum"  # ... and its arrays (see fedtl.models.ncm.class_sums)

# -- the round's config (ConfigRecord ``CONFIG`` of a training or evaluation message) --------
SERVER_ROUND = "server-round"  # set by Flower's strategies
FINGERPRINT = "backbone-fingerprint"  # the server's backbone fingerprint; clients refuse a mismatch
PROXIMAL_MU = "proximal-mu"  # Flower's FedProx puts its proximal weight here
PLAN_UNITS, PLAN_LRS, PLAN_EPOCHS = "plan.units", "plan.lrs", "plan.local-epochs"

# -- reply metrics --------------------------------------------------------------------
TRAIN_LOSS = "train-loss"
NUM_EXAMPLES = "num-examples"
STEPS = "steps"
UNIT_WEIGHT = "unit-weight"  # 1 in every reply, for strategies that weight clients equally
HELD_OUT = "held-out"  # also a node-config key
PARTITION_ID = "partition-id"  # also a node-config key
ACCURACY = "accuracy"
LOSS = "loss"
ECE = "ece"
ACCURACY_BEFORE = "accuracy-before"  # a held-out node, before it adapts the model
ACCURACY_PERSONAL = "accuracy-personal"  # the model the node would use (its own local tensors)
CLIENT_ACCURACY_MEAN = "client-accuracy-mean"  # the server's aggregate of the final evaluation
# A DP-SGD client's cumulative spend.
PRIVACY_EPSILON = "privacy.epsilon"
PRIVACY_DELTA = "privacy.delta"
PRIVACY_STEPS = "privacy.steps"
PRIVACY_NOISE = "privacy.noise-multiplier"
PRIVACY_SAMPLE_RATE = "privacy.sample-rate"
PRIVACY_METRICS = (PRIVACY_EPSILON, PRIVACY_DELTA, PRIVACY_STEPS, PRIVACY_NOISE, PRIVACY_SAMPLE_RATE)
# What the server adds to each reply's metrics in its own records (never sent by a client).
NODE_ID = "node-id"

# -- node config (``flower-supernode --node-config``; simulation sets the first two) --------
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"  # a SuperNode's own data
DEVICE = "device"  # "auto" | "cpu" | "cuda": where the node computes
THREADS = "threads"  # torch's CPU threads on the node
STATE_DIR = "state-dir"  # a folder where the node keeps its privacy spend across restarts (and runs)
STORE_DIR = "store-dir"  # the node's data store folder (its decoded data and feature cache)
NODE_MAX_EPSILON = "max-epsilon"  # the node's own cap on its DP-SGD spend over every run in its state-dir ...
NODE_MAX_EPSILON_DELTA = "max-epsilon-delta"  # ... at this delta (default 1e-5)
NODE_ANSWERS = "answers"  # what the node answers at all: "all" | "accounted" | "dp-sgd" (fedtl.clients.gate)
# The node's own LoRA rank (at most the run's finetune.lora-rank; also in its query reply, for the server).
LORA_RANK = "lora-rank"
NODE_CONFIG_KEYS = (PARTITION_ID, NUM_PARTITIONS, DATA_PATH, HELD_OUT, DEVICE, THREADS, STATE_DIR, STORE_DIR,
                    NODE_MAX_EPSILON, NODE_MAX_EPSILON_DELTA, NODE_ANSWERS, LORA_RANK)

# -- a node's context.state ---------------------------------------------------------------
LOCAL_STATE = "fedtl.local"  # ArrayRecord: the tensors a personalisation keeps on the node
PRIVACY_STATE = "fedtl.privacy"  # ConfigRecord: a DP-SGD client's accountant history
# Node state that a resumed simulation takes from the latest round a node ran, even one lost to the
# kill: spend that happened is never rolled back (``fedtl.simulations.node_state``).
SPENT_STATE = (PRIVACY_STATE,)


class Trainable(Protocol):
    """What a plan is applied to (``fedtl.models.transfer.TransferModel``)."""

    def set_trainable(self, blocks: tuple[str, ...], *, head: bool = True) -> None: ...


@dataclass(frozen=True)
class RoundPlan:
    """What clients do in one round; it travels in the round's config.

    Attributes
    ----------
    lrs : Mapping[str, float]
        Learning rate of every unit that trains (``"head"`` included), input to output.
    local_epochs : int
        Passes over the local data.
    proximal_mu : float
        Weight of FedProx's proximal term (0: none). Flower's FedProx sends it as
        ``PROXIMAL_MU`` in the round's config.
    """

    lrs: Mapping[str, float]
    local_epochs: int
    proximal_mu: float = 0.0

    @property
    def trainable_blocks(self) -> tuple[str, ...]:
        """Blocks that train (the head excluded)."""
        return tuple(u for u in self.lrs if u != HEAD)

    def without_head(self) -> RoundPlan:
        """The same plan with the head frozen."""
        return RoundPlan({u: lr for u, lr in self.lrs.items() if u != HEAD}, self.local_epochs, self.proximal_mu)

    def apply_to(self, model: Trainable) -> None:
        """Make ``model`` train exactly this plan's units (the head only if the plan has it)."""
        model.set_trainable(self.trainable_blocks, head=HEAD in self.lrs)

    def to_config(self) -> dict[str, list[str] | list[float] | int]:
        """Entries for the round's ConfigRecord."""
        return {PLAN_UNITS: list(self.lrs), PLAN_LRS: [float(v) for v in self.lrs.values()],
                PLAN_EPOCHS: self.local_epochs}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> RoundPlan:
        """Read the plan back from a received ConfigRecord.

        Raises
        ------
        ValueError
            If the config carries no valid plan.
        """
        units, lrs, epochs = config.get(PLAN_UNITS), config.get(PLAN_LRS), config.get(PLAN_EPOCHS)
        if not (isinstance(units, list) and isinstance(lrs, list) and len(units) == len(lrs)
                and isinstance(epochs, int)):
            raise ValueError(f"the round's config carries no valid plan ({PLAN_UNITS}, {PLAN_LRS}, {PLAN_EPOCHS}): "
                             "is the server fedtl's?")
        return cls(dict(zip(units, lrs)), epochs, float(config.get(PROXIMAL_MU, 0.0)))  # type: ignore[arg-type]
