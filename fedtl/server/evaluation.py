"""The server's evaluation of the global model after each round: on its own test set, recorded and checkpointed."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord

from fedtl.data.rows import LabelledImages
from fedtl.models.features import Feed, frozen_prefix
from fedtl.models.metrics import central_evaluate
from fedtl.models.transfer import TransferModel
from fedtl.protocol import ACCURACY, RoundPlan
from fedtl.run_folder import BACKBONE_FINGERPRINT, BEST_CHECKPOINT, LAST_CHECKPOINT, TRAVELLING_PARAMS
from fedtl.server.record import RunRecorder


class CentralEvaluation:
    """Evaluate the global arrays of each round on the server's test set, record the round's row, and write the
    ``last`` and ``best`` checkpoints.

    The test set goes through the feature cache from the lowest cut any round so far trained above
    (``cache_cut``): the blocks below it still hold the pre-trained weights.

    Parameters
    ----------
    model : TransferModel
        The run's model (the reference every round grows from); evaluated in place.
    plan : Callable[[int], RoundPlan]
        The plan of each round: which units the round's arrays hold.
    test : LabelledImages
        The server's test set.
    feed : Feed
        The run's feature cache.
    recorder : RunRecorder
        Where rows and checkpoints go; its rows so far (a resumed run's) set the best accuracy to beat.
    epsilon : Callable[[], float], optional
        The privacy spent so far, recorded in each row (the ledger's), if the run is accounted.
    """

    def __init__(self, model: TransferModel, plan: Callable[[int], RoundPlan], test: LabelledImages, feed: Feed,
                 recorder: RunRecorder, epsilon: Callable[[], float] | None = None) -> None:
        self.model, self.plan, self.test, self.feed = model, plan, test, feed
        self.recorder, self.epsilon = recorder, epsilon
        self.best_accuracy = max((r[ACCURACY] for r in recorder.rows if r["round"] > 0), default=-1.0)
        self.cache_cut = len(model.block_names)

    def replay(self, rounds: int) -> None:
        """Lower ``cache_cut`` as the first ``rounds`` plans did (the rounds a resumed run has behind it)."""
        for rnd in range(1, rounds + 1):
            self.replay_round(rnd)

    def __call__(self, rnd: int, arrays: ArrayRecord) -> None:
        model = self.model
        state = arrays.to_torch_state_dict()
        unknown = set(state) - set(model.state_dict())
        if unknown:
            raise ValueError(f"global model holds keys this model does not have: {sorted(unknown)[:5]}")
        model.load_state_dict(state, strict=False)
        self.replay_round(max(rnd, 1))
        metrics = central_evaluate(model, self.test, self.feed, cut=self.cache_cut)
        extra: dict[str, float] = {TRAVELLING_PARAMS: model.size()[TRAVELLING_PARAMS]}
        if self.epsilon is not None:
            extra["epsilon"] = self.epsilon()
        row = self.recorder.end_round(rnd, metrics, **extra)
        meta = {"round": rnd, ACCURACY: row[ACCURACY], BACKBONE_FINGERPRINT: model.backbone_fingerprint}
        self.recorder.checkpoint(LAST_CHECKPOINT, model.state_dict(), **meta)
        if rnd > 0 and row[ACCURACY] > self.best_accuracy:
            self.best_accuracy = row[ACCURACY]
            self.recorder.checkpoint(BEST_CHECKPOINT, model.state_dict(), **meta)

    def replay_round(self, rnd: int) -> None:
        """Apply round ``rnd``'s plan to the model and lower ``cache_cut`` to it."""
        self.plan(rnd).apply_to(self.model)
        self.cache_cut = min(self.cache_cut, frozen_prefix(self.model))
