"""Shared descriptions and their halves: every privacy mode has a client half and a server half, by name."""

from __future__ import annotations

import pytest

from fedtl.clients.privacy import CLIENT_PRIVACY
from fedtl.config import ConfigError
from fedtl.personalisation import PERSONALISATIONS
from fedtl.privacy import PRIVACY_MODES
from fedtl.strategies.privacy import SERVER_PRIVACY
from tests.helpers import make_config


def test_every_privacy_mode_has_both_halves() -> None:
    assert PRIVACY_MODES.names() == CLIENT_PRIVACY.names() == SERVER_PRIVACY.names()


def test_each_modes_facts() -> None:
    off, sgd, client = (PRIVACY_MODES.get(n) for n in ("off", "dp-sgd", "client-level"))
    assert not off.accounted and sgd.accounted and client.accounted
    assert sgd.per_sample and not client.per_sample
    assert client.uniform_weights and client.noised_update and not sgd.noised_update
    assert [m.level for m in (off, sgd, client)] == ["none", "sample", "client"]


def test_personalisations_say_what_stays_local() -> None:
    assert PERSONALISATIONS.get("fedrep").head_first and not PERSONALISATIONS.get("fedper").head_first
    assert not PERSONALISATIONS.get("fedbabu").trains_head and PERSONALISATIONS.get("fedbabu").tunes_head


@pytest.mark.parametrize(("sets", "message"), [
    (["privacy.mode=dp-sgd", "strategy.name=fedprox"], "FedProx's proximal term would be silently dropped"),
    (["privacy.mode=dp-sgd", "strategy.personalisation=fedrep"], "FedRep's extra head phase"),
    (["privacy.mode=client-level", "strategy.weighting=examples"], "calibrates its noise to equal client weights"),
    (["privacy.mode=dp-sgd", "strategy.name=qfedavg"], "q-FedAvg weights each update by the client's training loss"),
])
def test_entries_refuse_the_settings_they_cannot_honour(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(*sets)


def test_auto_weighting_follows_the_privacy_modes_fact() -> None:
    from fedtl.strategies.registry import weight_key

    assert weight_key(make_config("privacy.mode=client-level")) == "unit-weight"
    assert weight_key(make_config("privacy.mode=dp-sgd")) == "num-examples"
