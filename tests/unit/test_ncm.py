"""FedNCM's head start: class sums by hand, the head's decision is the cosine nearest class mean, the checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedtl.config import ConfigError
from fedtl.data.federated import LabelledImages
from fedtl.models.backbones import build_backbone
from fedtl.models.features import Feed, feeder
from fedtl.models.ncm import NCM_SCALE, class_sums, head_inputs, ncm_head
from fedtl.models.transfer import TransferModel
from fedtl.protocol import CLASS_SUMS, COUNTS, NORM_SUM, SUMS
from fedtl.server.head_start import class_sums_problem
from tests.helpers import make_config


def test_class_sums_by_hand() -> None:
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    sums, counts, norm_sum = class_sums(features, torch.tensor([0, 0, 2]), 3)
    torch.testing.assert_close(sums, torch.tensor([[0.6, 1.8], [0.0, 0.0], [1.0, 0.0]]))
    assert counts.tolist() == [2.0, 0.0, 1.0] and norm_sum.tolist() == [8.0]  # 5 + 2 + 1
    assert sums.dtype == counts.dtype == norm_sum.dtype == torch.float32  # as many bytes as the head


def test_the_pooled_head_is_the_cosine_nearest_class_mean_of_all_clients_data() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.randint(0, 4, (200,), generator=g)
    features = centres[labels] + torch.randn(200, 16, generator=g)
    # Four clients' sums added up are the sums of the pooled data: exact in one round.
    parts = [class_sums(features[i::4], labels[i::4], 4) for i in range(4)]
    pooled = [sum(p[k] for p in parts) for k in range(3)]
    for a, b in zip(pooled, class_sums(features, labels, 4), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    weight, bias = ncm_head(*pooled)
    means = F.normalize(torch.stack([F.normalize(features[labels == c], dim=1).mean(0) for c in range(4)]), dim=1)
    cosine = F.normalize(features, dim=1) @ means.T
    logits = features @ weight.T + bias
    assert torch.equal(logits.argmax(1), cosine.argmax(1))
    mean_norm = features.norm(dim=1).mean()
    torch.testing.assert_close(weight.norm(dim=1), torch.full((4,), NCM_SCALE / float(mean_norm)), rtol=1e-4, atol=0)
    assert not bias.any()


def test_a_class_no_client_holds_gets_a_zero_row_and_no_data_is_refused() -> None:
    weight, _ = ncm_head(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([2.0, 0.0]), torch.tensor([4.0]))
    assert weight[1].abs().sum() == 0 and weight[0].tolist() == pytest.approx([NCM_SCALE / 2, 0.0])
    with pytest.raises(ValueError, match="no example"):
        ncm_head(torch.zeros(2, 2), torch.zeros(2), torch.zeros(1))


def _reply(sums: np.ndarray, counts: np.ndarray, norm_sum: float, examples: int = 6) -> Message:
    arrays = ArrayRecord({SUMS: Array(sums.astype(np.float32)), COUNTS: Array(counts.astype(np.float32)),
                          NORM_SUM: Array(np.array([norm_sum], dtype=np.float32))})
    return Message(RecordDict({CLASS_SUMS: arrays, "metrics": MetricRecord({"num-examples": examples})}),
                   dst_node_id=0, message_type="query.class_means")


@pytest.mark.parametrize(("sums", "counts", "norm_sum", "problem"), [
    (np.ones((3, 2)), np.array([2, 2, 2]), 6.0, None),
    (np.ones((3, 2)), np.array([2, -1, 2]), 6.0, "not whole non-negative"),
    (np.ones((3, 2)), np.array([2, 2.5, 2]), 6.0, "not whole non-negative"),
    (np.ones((3, 2)) * 5, np.array([2, 2, 2]), 6.0, "longer than its count"),
    (np.ones((3, 2)), np.array([2, 2, 2]), -1.0, "negative"),
    (np.full((3, 2), np.nan), np.array([2, 2, 2]), 6.0, "NaN"),
    (np.ones((2, 2)), np.array([2, 2]), 6.0, "expected float32[3, 2]"),
    (np.zeros((3, 2)), np.array([0, 0, 0]), 0.0, "class counts add up to 0, not the num-examples it reports (6)"),
])
def test_a_head_start_reply_is_checked_before_it_is_added(task_identity: None, sums: np.ndarray, counts: np.ndarray,
                                                          norm_sum: float, problem: str | None) -> None:
    found = class_sums_problem(_reply(sums, counts, norm_sum), 3, 2)
    assert found is None if problem is None else problem in found


@pytest.mark.parametrize(("sets", "says"), [
    (["privacy.mode=dp-sgd"], "without noise, outside the privacy accountant"),
    (["privacy.mode=client-level"], "without noise, outside the privacy accountant"),
    (["strategy.personalisation=fedper"], "each client keeps its own head"),
    (["strategy.personalisation=fedrep"], "each client keeps its own head"),
    (["strategy.personalisation=fedbabu"], "keeps the head at its shared random start"),
])
def test_settings_a_head_start_cannot_honour_are_refused(sets: list[str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        make_config("finetune.head-init=ncm", *sets)
    make_config("finetune.head-init=random", *sets)  # the pair alone is refused, nothing else


def test_the_head_start_features_are_the_ones_feature_extraction_then_reuses(tmp_path) -> None:
    torch.manual_seed(0)
    model = TransferModel(build_backbone("small-cnn", 1, image_size=16), 10)
    data = LabelledImages(torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8), torch.randint(0, 10, (20,)), ("clean",) * 20)
    feed = Feed(cache_dir=str(tmp_path))
    features = head_inputs(model, data, feed)
    entries = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(entries) == 1 and features.shape == (20, model.head.in_features)
    model.set_trainable([])  # feature extraction: only the head trains
    f = feeder(model, data, feed, train=True)
    assert f.cached and sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == entries  # no second forward pass
    with torch.no_grad():
        plain = torch.nn.Sequential(*model.blocks.values()).eval()(data.batch(torch.arange(20)))
    torch.testing.assert_close(features, plain)
    torch.testing.assert_close(head_inputs(model, data, Feed()), plain)  # and without the cache
