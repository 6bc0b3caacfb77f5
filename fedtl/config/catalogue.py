"""What the config knows of each registry it chooses from: the names, in order, and the facts it reads.

The registries (backbones, scenarios, modes, strategies, privacy modes, ...) hold builders, and live in
layers that import torch, Flower or Ray; the config must not, so that building and checking a config
costs no heavy import (the ``fedtl`` command refuses a bad one in a fraction of a second). So each
registry the config names is declared here as data: its entries' names, in the order the config lists
them (its messages, ``docs/config.md``), and of each entry the facts the config reads (a mode's BatchNorm
policy, a privacy mode's per-sample training, ...). The rules across sections that an entry adds are
``fedtl.config.rules``, keyed by these catalogues.

The registries stay the source of the builders and must not drift from this page: each is built with
its catalogue (``Registry(kind, declared=...)``), which refuses a name not declared here, or a fact that
differs, when it is registered; ``tests/unit/test_config_catalogue.py`` checks that both list the same names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fedtl.errors import RegistryError

F = TypeVar("F")


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so the rules can be keyed by a catalogue
class Catalogue(Generic[F]):
    """One registry as the config knows it.

    Attributes
    ----------
    registry : str
        Where the registry itself lives, ``"module:NAME"`` (tests import it to compare).
    entries : Mapping[str, F]
        Each entry's name, in the order the config lists them, and its facts.
    """

    registry: str
    entries: Mapping[str, F]

    @property
    def name(self) -> str:
        """The registry's name, and this catalogue's in this module (``PRIVACY_MODES``)."""
        return self.registry.rsplit(":", 1)[-1]

    def names(self) -> list[str]:
        """Every declared name, in order: the config's allowed values."""
        return list(self.entries)

    def get(self, name: str) -> F:
        """The facts of entry ``name``.

        Raises
        ------
        RegistryError
            If ``name`` is not declared (the config refuses such a value before any rule reads it).
        """
        try:
            return self.entries[name]
        except KeyError:
            raise RegistryError(f"{name!r} is not declared in {self.name} (fedtl/config/catalogue.py); declared: "
                                f"{', '.join(self.entries)}") from None

    def facts(self, name: str) -> dict[str, Any]:
        """The facts of entry ``name`` by attribute name: what its registry entry must hold too."""
        return dataclasses.asdict(self.get(name))  # type: ignore[arg-type]  (F: one of the facts dataclasses below)

    def __contains__(self, name: object) -> bool:
        return name in self.entries


@dataclass(frozen=True)
class Named:
    """An entry of which the config reads only the name."""


@dataclass(frozen=True)
class ModeFacts:
    """A fine-tuning mode (``fedtl.models.modes.Mode``).

    Attributes
    ----------
    batchnorm : str or None
        Its own BatchNorm policy, which ``finetune.batchnorm = "auto"`` gives it (default ``None``: none).
    """

    batchnorm: str | None = None


@dataclass(frozen=True)
class HeadInitFacts:
    """A head initialisation (``fedtl.models.ncm.HeadInit``).

    Attributes
    ----------
    class_means : bool
        Whether the clients send their class sums before round one (default ``False``).
    """

    class_means: bool = False


@dataclass(frozen=True)
class StrategyFacts:
    """A strategy (``fedtl.strategies.registry.StrategyEntry``).

    Attributes
    ----------
    averages : bool
        Whether its aggregate is the weighted mean of the updates, FedAvg's (default ``False``).
    """

    averages: bool = False


@dataclass(frozen=True)
class PersonalisationFacts:
    """A personalisation (``fedtl.personalisation.Personalisation``).

    Attributes
    ----------
    batchnorm : str or None
        Its own BatchNorm policy, which ``finetune.batchnorm = "auto"`` gives it (default ``None``: none).
    lora_only : bool
        Whether it keeps only LoRA tensors local (default ``False``).
    """

    batchnorm: str | None = None
    lora_only: bool = False


@dataclass(frozen=True)
class PrivacyFacts:
    """A privacy mode (``fedtl.privacy.PrivacyMode``).

    Attributes
    ----------
    per_sample : bool
        Whether clients train by DP-SGD, from clipped per-sample gradients of the data loss alone (default ``False``).
    noised_update : bool
        Whether the server noises the merged update (default ``False``).
    """

    per_sample: bool = False
    noised_update: bool = False


def _names(registry: str, *names: str) -> Catalogue[Named]:
    return Catalogue(registry, dict.fromkeys(names, Named()))


DEVICES = _names("fedtl.devices:DEVICES", "auto", "cpu", "cuda")
SCENARIOS = _names("fedtl.data.scenarios:SCENARIOS", "digits-domain-shift", "digits-split-class", "torchvision",
                   "image-folder", "client-folders", "hf-dataset", "nodes", "photo-textures", "lfw-faces", "text")
PARTITIONERS = _names("fedtl.data.partition:PARTITIONERS", "iid", "dirichlet", "natural")
AUGMENTATIONS = _names("fedtl.data.augment:AUGMENTATIONS", "none", "flip", "crop-flip")
BACKBONES = _names("fedtl.models.backbones:BACKBONES", "efficientnet-lite0", "hf-text", "minilm", "small-cnn",
                   "small-cnn-bn", "resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                   "convnext_tiny", "vit_b_16")
NORMS = _names("fedtl.models.backbones:NORMS", "native", "group")
MODES = Catalogue("fedtl.models.modes:MODES", {
    "feature-extraction": ModeFacts(), "full": ModeFacts(), "discriminative": ModeFacts(),
    "gradual-unfreezing": ModeFacts(), "lora": ModeFacts(), "ffa-lora": ModeFacts(),
    "bn-only": ModeFacts(batchnorm="batch"),  # BN-adapt's point is moving the statistics
    "bias-only": ModeFacts(),
})
HEAD_INITS = Catalogue("fedtl.models.ncm:HEAD_INITS", {"random": HeadInitFacts(), "ncm": HeadInitFacts(class_means=True)})
STRATEGIES = Catalogue("fedtl.strategies.registry:STRATEGIES", {
    "fedavg": StrategyFacts(averages=True), "fedprox": StrategyFacts(averages=True), "fedadam": StrategyFacts(),
    "fedyogi": StrategyFacts(), "fedadagrad": StrategyFacts(), "fedavgm": StrategyFacts(), "fedmedian": StrategyFacts(),
    "fedtrimmedavg": StrategyFacts(), "krum": StrategyFacts(), "multikrum": StrategyFacts(), "bulyan": StrategyFacts(),
    "qfedavg": StrategyFacts(),
})
PERSONALISATIONS = Catalogue("fedtl.personalisation:PERSONALISATIONS", {
    "none": PersonalisationFacts(), "fedper": PersonalisationFacts(), "fedbn": PersonalisationFacts(batchnorm="local"),
    "fedrep": PersonalisationFacts(), "fedbabu": PersonalisationFacts(), "fedsa-lora": PersonalisationFacts(lora_only=True),
})
LORA_MERGES = _names("fedtl.strategies.lora:LORA_MERGES", "average", "hetlora", "stack")
PRIVACY_MODES = Catalogue("fedtl.privacy:PRIVACY_MODES", {
    "off": PrivacyFacts(), "dp-sgd": PrivacyFacts(per_sample=True), "client-level": PrivacyFacts(noised_update=True),
})

CATALOGUES: tuple[Catalogue[Any], ...] = (DEVICES, SCENARIOS, PARTITIONERS, AUGMENTATIONS, BACKBONES, NORMS, MODES,
                                          HEAD_INITS, STRATEGIES, PERSONALISATIONS, LORA_MERGES, PRIVACY_MODES)
"""Every catalogue, one per registry the config chooses from."""
