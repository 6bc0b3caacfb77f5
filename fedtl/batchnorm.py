"""BatchNorm policies: what a trainable BatchNorm layer does in local training; one registry entry each.

A BatchNorm layer computes two different functions: in train mode it normalises by the statistics of
the batch in front of it (and moves its running statistics toward them), in eval mode by its running
statistics. Federated fine-tuning makes the difference large: a client's batch is a handful of its own
images, often of one style, while evaluation uses running statistics that, for a pre-trained backbone
with a slow momentum (EfficientNet-Lite's 0.01), are still ImageNet's. The head then learns on one
function and is scored on another (docs/concepts.md has the numbers). So each run states its policy:

- ``frozen``: statistics fixed (eval mode) while the affine terms γ/β still train where the mode trains
  them; the function trained is the function evaluated, and statistics that never change never travel.
  The default for pre-trained weights (torchvision's ``FrozenBatchNorm2d``; Keras's fine-tuning guide).
- ``batch``: statistics from the batches, running statistics updated at the standard momentum (0.1) and
  merged by the weighted mean: how an architecture trains from random init (the scratch baseline), and
  ``bn-only``'s point (BN-adapt).
- ``local``: statistics from the batches, running statistics kept on each client (SiloBN, Andreux et al.
  2020; with ``strategy.personalisation = "fedbn"`` the affine terms stay too: FedBN, Li et al. 2021).

``finetune.batchnorm = "auto"`` is resolved when the config is built (the run's ``config.toml`` records
the result): ``batch`` from scratch, else the personalisation's or the mode's own policy where it has one
(FedBN: ``local``; ``bn-only``: ``batch``), else ``frozen``. This module imports nothing heavy: the config
imports it (both sit in the bottom layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtl.registry import Registry

# The config's value for "resolve when the config is built" (fedtl.config.schema).
AUTO = "auto"
# Momentum of running statistics that move: PyTorch's default. A pre-trained network's own can be far
# slower (EfficientNet-Lite: 0.01, TensorFlow's 0.99 decay), which after a federated run's few dozen local
# steps leaves running statistics near their initial values, far from what the batches gave.
MOVING_MOMENTUM = 0.1


@dataclass(frozen=True)
class BatchNormPolicy:
    """What a BatchNorm layer of a trainable unit does in local training.

    Attributes
    ----------
    moves : bool
        It normalises with its batch's statistics and updates its running ones (train mode);
        ``False``: eval mode, running statistics fixed (γ/β still train).
    travels : bool
        Its running statistics go to the server and are merged (weighted mean); ``False`` where they
        move: each client keeps its own.
    """

    moves: bool
    travels: bool


BATCHNORM: Registry[BatchNormPolicy] = Registry("BatchNorm policy")
BATCHNORM.register("frozen")(BatchNormPolicy(moves=False, travels=False))
BATCHNORM.register("batch")(BatchNormPolicy(moves=True, travels=True))
BATCHNORM.register("local")(BatchNormPolicy(moves=True, travels=False))
