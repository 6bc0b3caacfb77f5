"""The config's catalogue of each registry it chooses from equals the registry: names, order and facts."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import pytest

from fedtl.config import ExperimentConfig
from fedtl.config.catalogue import CATALOGUES, Catalogue, HeadInitFacts, Named
from fedtl.config.fields import fields_of
from fedtl.config.rules import RULES
from fedtl.errors import RegistryError
from fedtl.registry import Registry


def _chosen_from(cls: type) -> list[Catalogue[Any]]:
    """Every catalogue a field of ``cls``'s tree chooses from."""
    out: list[Catalogue[Any]] = []
    for f, tp in fields_of(cls).values():
        if dataclasses.is_dataclass(tp):
            out += _chosen_from(tp)
        elif isinstance(f.metadata.get("choices"), Catalogue):
            out.append(f.metadata["choices"])
    return out


def _registry(catalogue: Catalogue[Any]) -> Registry[Any]:
    module, name = catalogue.registry.split(":")
    return getattr(importlib.import_module(module), name)


def test_every_registry_the_config_names_has_one_catalogue() -> None:
    chosen = _chosen_from(ExperimentConfig)
    assert len(chosen) == len(set(chosen))
    assert set(chosen) == set(CATALOGUES)


@pytest.mark.parametrize("catalogue", CATALOGUES, ids=lambda c: c.name)
def test_the_catalogue_lists_the_registrys_names_in_order(catalogue: Catalogue[Any]) -> None:
    registry = _registry(catalogue)
    assert registry.names() == catalogue.names()
    assert registry.declared is catalogue  # so that each registration is checked against it


@pytest.mark.parametrize("catalogue", CATALOGUES, ids=lambda c: c.name)
def test_each_entry_holds_the_facts_the_catalogue_declares(catalogue: Catalogue[Any]) -> None:
    registry = _registry(catalogue)
    for name in catalogue.names():
        facts = catalogue.facts(name)
        assert {fact: getattr(registry.get(name), fact) for fact in facts} == facts, name


def test_every_rule_belongs_to_a_declared_entry() -> None:
    for catalogue, name in RULES:
        assert catalogue in CATALOGUES and name in catalogue, (catalogue.name, name)


def test_a_registry_refuses_a_name_or_fact_its_catalogue_does_not_declare() -> None:
    declared = Catalogue("tests:THINGS", {"a": HeadInitFacts(class_means=True), "b": Named()})
    things: Registry[Any] = Registry("thing", declared=declared)
    with pytest.raises(RegistryError, match=r"thing 'c' is not declared in the config's catalogue, so a config could "
                                            r"not choose it: add it to THINGS in fedtl/config/catalogue.py"):
        things.register("c")(object())
    with pytest.raises(RegistryError, match=r"thing 'a' has class_means = False, but THINGS in "
                                            r"fedtl/config/catalogue.py declares True"):
        things.register("a")(HeadInitFacts(class_means=False))
    things.register("a")(HeadInitFacts(class_means=True))
    assert things.names() == ["a"]
