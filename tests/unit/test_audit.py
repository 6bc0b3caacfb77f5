"""The empirical privacy audit: the one-run bound's maths, the guesses, the canaries and where they are planted."""

from __future__ import annotations

import dataclasses
import json
import math
import stat
from pathlib import Path

import pytest
import torch

from fedtl.config import ConfigError
from fedtl.data.canaries import canary_images, make_canaries, read_canaries, with_canaries, write_canaries
from fedtl.data.federated import client_data, scenario
from fedtl.data.rows import LabelledImages
from fedtl.errors import DataError, StudyError
from fedtl.reports.audit import audit, epsilon_lower_bound, p_value, split_guesses
from fedtl.simulations.audit import (
    AuditSpec,
    accounted_epsilon,
    check_audit,
    draw_canaries,
    level_config,
    parse_epsilons,
)
from tests.helpers import make_config
from tests.unit.test_text import write_reviews, write_tiny_bert


# -- the bound ----------------------------------------------------------------------------------
def test_p_value_without_delta_is_the_binomial_tail_of_randomised_response() -> None:
    # epsilon = 0: every guess is a fair coin; 10 right of 10 has chance 2^-10.
    assert p_value(100, 10, 10, 0.0, 0.0) == pytest.approx(2 ** -10)
    # 9 or more right of 10 at q = e/(1+e): q^10 + 10 q^9 (1-q).
    q = math.e / (1 + math.e)
    assert p_value(100, 10, 9, 1.0, 0.0) == pytest.approx(q ** 10 + 10 * q ** 9 * (1 - q))


def test_p_value_adds_the_delta_term_by_hand() -> None:
    # r = v = 2: alpha = max(P[B = 1] / 1, (P[B = 1] + P[B = 0]) / 2), B ~ Binomial(2, q).
    q = 1 / (1 + math.exp(-0.5))
    one, zero = 2 * q * (1 - q), (1 - q) ** 2
    alpha = max(one, (one + zero) / 2)
    m, delta = 50, 1e-3
    assert p_value(m, 2, 2, 0.5, delta) == pytest.approx(q ** 2 + alpha * delta * 2 * m)


def test_the_bound_inverts_the_tail_and_every_right_guess_has_a_closed_form() -> None:
    # All r right with delta = 0: p = q^r, so the bound is the epsilon with q^r = 0.05.
    for r in (10, 20, 40):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(200, r, r, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    assert epsilon_lower_bound(200, 40, 40, delta=1e-5) < epsilon_lower_bound(200, 40, 40, delta=0.0)
    # Chance-level guessing refutes nothing, and a delta this large explains any count.
    assert epsilon_lower_bound(200, 40, 20, delta=1e-5) == 0.0
    assert epsilon_lower_bound(200, 40, 40, delta=0.01) == 0.0
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(10, 20, 5, 1.0, 0.0)


def test_guesses_are_the_lowest_and_highest_losses_in_numbers_fixed_in_advance() -> None:
    included = torch.tensor([True, False] * 10)
    planted_low = torch.where(included, 0.1, 2.0) + torch.arange(20) * 1e-3
    found = audit(planted_low, included, guesses=8, delta=0.0)
    assert split_guesses(8) == (4, 4) and split_guesses(5) == (3, 2)
    assert (found.correct, found.guesses, found.planted, found.auc) == (8, 8, 10, 1.0)
    assert found.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(20, 8, 8, delta=0.0))
    backwards = audit(-planted_low, included, guesses=8, delta=0.0)
    assert (backwards.correct, backwards.auc, backwards.epsilon_lower_bound) == (0, 0.0, 0.0)
    with pytest.raises(ValueError, match="between 1 and the number of canaries"):
        audit(planted_low, included, guesses=21, delta=0.0)


# -- canaries ----------------------------------------------------------------------------------
def test_canaries_are_random_images_with_random_labels_and_fair_coins() -> None:
    images, labels, included = make_canaries(2000, shape=(1, 8, 8), num_classes=10, seed=3)
    assert images.dtype == torch.uint8 and images.shape == (2000, 1, 8, 8) and labels.max() == 9
    assert 900 < int(included.sum()) < 1100
    again = make_canaries(2000, shape=(1, 8, 8), num_classes=10, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again, (images, labels, included), strict=True))


def test_only_the_canary_client_trains_on_the_planted_canaries(tmp_path: Path) -> None:
    cfg = make_config("clients=3", "labelled-per-client=0")
    sc = scenario(cfg.data)
    images, labels, _ = make_canaries(5, shape=tuple(sc.pool_x.shape[1:]), num_classes=10, seed=1)
    path = write_canaries(tmp_path / "planted.safetensors", images, labels)
    planted = cfg.replace(data=dataclasses.replace(cfg.data, canaries=str(path)))
    own = client_data(cfg.data, 0, 3, 0)
    with_them = client_data(planted.data, 0, 3, 0)
    assert len(with_them) == len(own) + 5
    assert torch.equal(with_them.x[:len(own)], own.x)  # its own items, in their style, as they were
    assert torch.equal(with_them.x[len(own):], images.float() / 255) and torch.equal(with_them.y[len(own):], labels)
    assert torch.equal(client_data(planted.data, 1, 3, 0).x, client_data(cfg.data, 1, 3, 0).x)


def test_canary_files_that_do_not_fit_are_refused_with_the_fix(tmp_path: Path) -> None:
    images, labels, _ = make_canaries(4, shape=(1, 8, 8), num_classes=10, seed=0)
    path = write_canaries(tmp_path / "c.safetensors", images, labels)
    with pytest.raises(DataError, match=r"shape \(1, 8, 8\), the scenario's are \(1, 16, 16\)"):
        canary_images(path, shape=(1, 16, 16), num_classes=10)
    with pytest.raises(DataError, match="labels outside the scenario's 2 classes"):
        canary_images(path, shape=(1, 8, 8), num_classes=2)
    (tmp_path / "junk").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="cannot be read"):
        read_canaries(tmp_path / "junk")
    tokens = LabelledImages(torch.zeros(3, 5, dtype=torch.long), torch.zeros(3), ("clean",) * 3)
    with pytest.raises(DataError, match="token ids"):
        with_canaries(tokens, canary_images(path, shape=(1, 8, 8), num_classes=10))
    with pytest.raises(ConfigError, match="data.canary-client = 3 is not a training client"):
        make_config("clients=3", f"data.canaries={str(path)!r}", "data.canary-client=3")


def test_the_coins_are_fresh_owner_only_and_only_the_planted_canaries_reach_the_client(tmp_path: Path) -> None:
    cfg = make_config("clients=3", "privacy.mode='dp-sgd'")
    spec = AuditSpec((1.0, math.inf), canaries=64, guesses=16)
    first = draw_canaries(cfg, spec, tmp_path / "a", overwrite=False)
    auditor, planted = tmp_path / "a" / "canaries.safetensors", tmp_path / "a" / "planted.safetensors"
    assert stat.S_IMODE(auditor.stat().st_mode) == 0o600
    client = read_canaries(planted)
    assert "included" not in client and torch.equal(client["images"], first["images"][first["included"]])
    # Drawn once: a rerun reads the same coins back; a second audit of the same config draws others.
    assert torch.equal(draw_canaries(cfg, spec, tmp_path / "a", overwrite=False)["included"], first["included"])
    assert not torch.equal(draw_canaries(cfg, spec, tmp_path / "b", overwrite=False)["images"], first["images"])
    # Runs trained on coins that are gone are never scored against new ones.
    auditor.unlink()
    with pytest.raises(StudyError, match="new coins would not be the ones they trained on"):
        draw_canaries(cfg, spec, tmp_path / "a", overwrite=False, trained=True)


def test_each_level_is_the_same_run_at_its_epsilon_or_without_dp(tmp_path: Path) -> None:
    cfg = make_config("clients=3", "privacy.mode='dp-sgd'", "privacy.delta=1e-6")
    one, none = (level_config(cfg, e, tmp_path) for e in (1.0, math.inf))
    assert (one.privacy.mode, one.privacy.target_epsilon, one.privacy.delta) == ("dp-sgd", 1.0, 1e-6)
    assert none.privacy.mode == "off" and Path(none.out) == tmp_path / "eps-inf"
    assert one.data.canaries == none.data.canaries == str(tmp_path / "planted.safetensors")
    assert one.replace(privacy=cfg.privacy, data=cfg.data, name=cfg.name, out=cfg.out) == cfg
    assert parse_epsilons("1, 3,8,inf") == (1.0, 3.0, 8.0, math.inf)


def test_an_audit_that_cannot_be_done_is_refused_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="spends no epsilon, so epsilon = 1 has nothing to audit"):
        check_audit(make_config(), AuditSpec((1.0, math.inf)))
    check_audit(make_config(), AuditSpec((math.inf,)))  # without DP only: nothing accounted to compare
    with pytest.raises(ConfigError, match="epsilons above 0"):
        AuditSpec((0.0,))
    with pytest.raises(ConfigError, match="between 1 and that many guesses"):
        AuditSpec((1.0,), canaries=10, guesses=11)
    with pytest.raises(ConfigError, match="numbers separated by commas"):
        parse_epsilons("1,three")
    write_tiny_bert(tmp_path / "bert")
    text = make_config("data.scenario='text'", f"data.path={str(write_reviews(tmp_path / 'r.csv'))!r}",
                       f"data.tokenizer={str(tmp_path / 'bert')!r}", "model.backbone='hf-text'",
                       f"model.weights-path={str(tmp_path / 'bert')!r}", f"data.store-dir={str(tmp_path / 'store')!r}")
    with pytest.raises(ConfigError, match="holds text; the audit's canaries are images"):
        check_audit(text, AuditSpec((math.inf,)))


def test_an_audit_folder_is_scored_only_by_the_test_fixed_with_its_coins(tmp_path: Path) -> None:
    cfg = make_config("clients=3", "privacy.mode='dp-sgd'")
    spec = AuditSpec((1.0, math.inf), canaries=64, guesses=16)
    first = draw_canaries(cfg, spec, tmp_path / "a", overwrite=False)
    assert json.loads((tmp_path / "a" / "audit-spec.json").read_text()) == {
        "canaries": 64, "guesses": 16, "confidence": 0.95, "delta": 1e-5}
    # Other guesses after seeing the scores: refused, saying which were fixed.
    with pytest.raises(StudyError, match="fixed its test before its first run: guesses 16 \\(asked: 24\\).*"
                                         "--canaries 64 --guesses 16"):
        draw_canaries(cfg, dataclasses.replace(spec, guesses=24), tmp_path / "a", overwrite=False)
    with pytest.raises(StudyError, match="delta 1e-05 \\(asked: 0.001\\)"):
        draw_canaries(make_config("clients=3", "privacy.mode='dp-sgd'", "privacy.delta=0.001"), spec,
                      tmp_path / "a", overwrite=False)
    assert torch.equal(draw_canaries(cfg, spec, tmp_path / "a", overwrite=False)["included"], first["included"])
    # A folder whose guesses were never fixed cannot be scored with a confidence it never had.
    (tmp_path / "a" / "audit-spec.json").unlink()
    with pytest.raises(StudyError, match="its guesses were never fixed before its runs"):
        draw_canaries(cfg, spec, tmp_path / "a", overwrite=False)
    again = draw_canaries(cfg, dataclasses.replace(spec, guesses=24), tmp_path / "a", overwrite=True)
    assert not torch.equal(again["images"], first["images"])


def test_client_level_audits_compare_with_the_replace_one_epsilon(tmp_path: Path) -> None:
    # The canary client stays in and its update changes: replace-one. (The zero-out epsilon is the smaller.)
    privacy = {"epsilon_max": 0.99, "epsilon_replace_one": 2.118, "epsilon_per_client": {"0": 0.7}}
    client = level_config(make_config("clients=3", "privacy.mode='client-level'"), 1.0, tmp_path)
    sample = level_config(make_config("clients=3", "privacy.mode='dp-sgd'"), 1.0, tmp_path)
    assert accounted_epsilon(client, privacy) == 2.118
    assert accounted_epsilon(sample, privacy) == 0.7  # DP-SGD: the canary added or not, its client's own epsilon
