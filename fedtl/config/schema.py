"""ExperimentConfig: the typed, validated description of one federated run.

One source of truth, parsed once: TOML file -> ``--set`` overrides -> frozen
dataclasses (each checks its fields on construction) -> flattened into Flower's
``run_config`` -> parsed back, identically, by the ServerApp and every ClientApp.

TOML keys are kebab-case (``local-epochs``), Python fields snake_case.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from fedtl.batchnorm import AUTO, BATCHNORM
from fedtl.config.fields import (
    ConfigError,
    Scalar,
    Validated,
    build,
    entry_checks,
    flatten,
    in_range,
    one_of,
    registry_entry,
    to_dict,
    unflatten,
)

FINETUNE_MODES = "fedtl.models.modes:MODES"
# finetune.batchnorm: "auto" or a policy of fedtl.batchnorm (torch-free data, beside the config).
BATCHNORM_CHOICES = (AUTO, *BATCHNORM.names())


@dataclass(frozen=True)
class DataConfig(Validated):
    """Where each client's data comes from and how it is split."""

    SECTION = "data."

    # The data (docs/data-and-backbones.md; `nodes`: data on the SuperNodes, docs/deploy.md).
    scenario: str = field(default="digits-domain-shift", metadata=one_of("fedtl.data.scenarios:SCENARIOS"))
    # Flwr-datasets partitioner of the target pool (`natural`: client folders).
    partitioner: str = field(default="iid", metadata=one_of("fedtl.data.partition:PARTITIONERS"))
    # Dirichlet concentration (small = strong label skew).
    alpha: float = field(default=0.5, metadata=in_range(0.0, None, lo_open=True))
    # Labelled images each client keeps (0 = its whole partition).
    labelled_per_client: int = field(default=10, metadata=in_range(0))
    # Smallest partition the partitioner may produce.
    min_partition_size: int = field(default=2, metadata=in_range(0))
    # The last share of each client's partition: its own test images, never trained on.
    client_test_fraction: float = field(default=0.2, metadata=in_range(0.0, 0.9))
    # Clients (the highest partition ids) kept out of training: the adaptability figures.
    held_out_clients: int = field(default=0, metadata=in_range(0))
    # Share of the target half held out as the server's test set.
    test_fraction: float = field(default=0.3, metadata=in_range(0.0, 0.9, lo_open=True))
    # Image side after resizing.
    image_size: int = field(default=16, metadata=in_range(8, 512))
    # Real data (scenarios torchvision, image-folder, hf-dataset): local files only.
    dataset: str = ""  # torchvision: the data set class, e.g. "CIFAR10"
    root: str = ""  # torchvision: the folder its files are in
    download: bool = False  # torchvision: download into root when missing (online machines only)
    # torchvision: check the files' MD5 sums against the published ones (false: files re-packed locally)
    verify_checksums: bool = True
    path: str = ""  # image-folder, hf-dataset: the folder
    image_column: str = "image"  # hf-dataset
    label_column: str = "label"  # hf-dataset
    bad_images: str = field(default="skip", metadata=one_of(("skip", "error")))  # unreadable image files
    text_column: str = "text"  # text
    tokenizer: str = ""  # text: the model directory whose tokenizer to use ("minilm": the package's)
    max_length: int = field(default=64, metadata=in_range(2, 4096))  # text: tokens per text (padded, truncated)
    # Feature skew on any image data: client i sees its images in style i mod 5 (as the digits study).
    domain_skew: bool = False
    # Data on the nodes (deployment): the class names labels index, comma-separated ("" : a node's
    # class subfolders, sorted), and the images' channels under data.scenario = "nodes".
    classes: str = ""
    # `nodes`: the images' channels.
    channels: int = field(default=3, metadata=one_of((1, 3)))
    # The data store: each data set decoded once per machine (uint8 at image-size), memory-mapped by every
    # process; the feature cache lives in it too (made absolute; a node's config may name its own, store-dir).
    store_dir: str = ".fedtl-cache/store"
    # Random augmentation of each training batch (torchvision transforms v2); the feature cache is off under it.
    augment: str = field(default="none", metadata=one_of("fedtl.data.augment:AUGMENTATIONS"))
    # The privacy audit's planted canaries (a file `fedtl audit` writes): extra training images of one client.
    canaries: str = ""
    canary_client: int = field(default=0, metadata=in_range(0))  # The partition that trains on the canaries.


@dataclass(frozen=True)
class ModelConfig(Validated):
    """Which backbone every client fine-tunes."""

    SECTION = "model."

    # Backbone family.
    backbone: str = field(default="small-cnn", metadata=one_of("fedtl.models.backbones:BACKBONES"))
    # "group" swaps every BatchNorm for GroupNorm (Opacus's ModuleValidator.fix) before
    # pre-training, so normalisation layers can train under DP-SGD.
    norm: str = field(default="native", metadata=one_of("fedtl.models.backbones:NORMS"))
    # Outside pre-trained weights (init = "pretrained"); both empty: fedtl pre-trains the backbone
    # on the scenario's source data. A torchvision weights name ("IMAGENET1K_V1", "DEFAULT") ...
    weights: str = ""
    # ... or a local state dict (.safetensors, or .pth/.pt read with weights_only=True), or a fedtl
    # run's checkpoints/last.safetensors (its blocks seed this run; the head is new).
    weights_path: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weights and self.weights_path:
            raise ConfigError(f"model.weights = {self.weights!r} and model.weights-path = {self.weights_path!r} both "
                              "name pre-trained weights: keep one")


@dataclass(frozen=True)
class FinetuneConfig(Validated):
    """How clients fine-tune: the mode and its local optimisation."""

    SECTION = "finetune."

    # Fine-tuning mode.
    mode: str = field(default="feature-extraction", metadata=one_of(FINETUNE_MODES))
    # The head's learning rate (SGD).
    lr: float = field(default=0.05, metadata=in_range(0.0, 10.0, lo_open=True))
    # Blocks' rate relative to `lr` in `full` and `gradual-unfreezing`.
    backbone_lr_scale: float = field(default=0.1, metadata=in_range(0.0, 1.0, lo_open=True))
    # Per-block decay in `discriminative`.
    lr_decay: float = field(default=0.5, metadata=in_range(0.0, 1.0, lo_open=True))
    # Rounds between unfreezing steps.
    unfreeze_every: int = field(default=3, metadata=in_range(1))
    # Passes over local data per round.
    local_epochs: int = field(default=2, metadata=in_range(1, 1000))
    # Local batch size.
    batch_size: int = field(default=16, metadata=in_range(1))
    # SGD momentum.
    momentum: float = field(default=0.9, metadata=in_range(0.0, 1.0))
    # SGD weight decay.
    weight_decay: float = field(default=0.0, metadata=in_range(0.0, 1.0))
    # Adapter modes (lora, ffa-lora, bn-only, bias-only): the top this many blocks get the adapter (0: all).
    adapter_blocks: int = field(default=0, metadata=in_range(0))
    # `lora`, `ffa-lora`: rank r.
    lora_rank: int = field(default=4, metadata=in_range(1, 4096))
    # `lora`, `ffa-lora`: scaling α (the update is α/r · B·A).
    lora_alpha: float = field(default=8.0, metadata=in_range(0.0, None, lo_open=True))
    # `lora`, `ffa-lora`: dropout on the adapter's input.
    lora_dropout: float = field(default=0.0, metadata=in_range(0.0, 1.0))
    # Which layers of those blocks LoRA adapts: every Conv2d/Linear, or only attention's projections.
    lora_targets: str = field(default="all", metadata=one_of(("all", "attention")))
    # `lora` under strategy.lora-merge = "hetlora" or "stack": each client's own rank by partition id, cycling
    # ("2,4,8": partition 0 gets 2, partition 1 gets 4, 2 gets 8, 3 gets 2 ...), each at most lora-rank (the
    # server's); a SuperNode's node config lora-rank sets its own. "": every client at lora-rank.
    lora_ranks: str = ""
    # "auto": where every trainable tensor sits above a frozen prefix of blocks, compute the prefix once per
    # image (cached on disk, shared by the machine's processes) and train the rest on it; exact. "off": never.
    feature_cache: str = field(default="auto", metadata=one_of(("auto", "off")))
    # How the head starts: "random" (seeded), or "ncm": the clients' class means of the frozen features, in a
    # round 0 before training (FedNCM; docs/concepts.md).
    head_init: str = field(default="random", metadata=one_of("fedtl.models.ncm:HEAD_INITS"))
    # After a head start, the head trains at lr × this (FedNCM+FT): full-rate steps on each client's few images
    # undo the class means (docs/concepts.md: Lite0 at 64 px fell from 0.378 to 0.207 in two rounds).
    head_start_lr_scale: float = field(default=0.1, metadata=in_range(0.0, 1.0, lo_open=True))
    # What a trainable BatchNorm does in local training (fedtl.batchnorm; docs/concepts.md): "frozen" (running
    # statistics fixed, γ/β still train; they never travel), "batch" (batch statistics, running ones at momentum
    # 0.1, merged), "local" (batch statistics, running ones kept on each client). "auto", resolved when the config
    # is read: batch from scratch, else the personalisation's or the mode's own (fedbn: local; bn-only: batch),
    # else frozen.
    batchnorm: str = field(default="auto", metadata=one_of(BATCHNORM_CHOICES))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rank_schedule  # noqa: B018 (parsed now: refused when the config is read, not in a client)

    @property
    def rank_schedule(self) -> tuple[int, ...]:
        """``lora-ranks`` as ranks (empty: none).

        Raises
        ------
        ConfigError
            If an entry is not a whole number from 1 to ``lora-rank``.
        """
        ranks = []
        for part in filter(None, (p.strip() for p in self.lora_ranks.split(","))):
            if not part.isdigit() or not 1 <= int(part) <= self.lora_rank:
                raise ConfigError(f"finetune.lora-ranks = {self.lora_ranks!r}: {part!r} is not a rank from 1 to "
                                  f"finetune.lora-rank = {self.lora_rank} (the server's, the largest); write e.g. "
                                  "\"2,4,8\" with lora-rank = 8")
            ranks.append(int(part))
        return tuple(ranks)

    def rank_of(self, partition: int | None) -> int:
        """The LoRA rank of the client of ``partition`` under ``lora-ranks`` (``lora-rank`` without one)."""
        ranks = self.rank_schedule
        return ranks[partition % len(ranks)] if ranks and partition is not None else self.lora_rank


STRATEGY_PERSONALISATIONS = "fedtl.personalisation:PERSONALISATIONS"


@dataclass(frozen=True)
class StrategyConfig(Validated):
    """How the server samples clients and merges what they trained."""

    SECTION = "strategy."

    # Flower strategy (docs/concepts.md).
    name: str = field(default="fedavg", metadata=one_of("fedtl.strategies.registry:STRATEGIES"))
    # Share of clients sampled per round.
    fraction_train: float = field(default=1.0, metadata=in_range(0.0, 1.0, lo_open=True))
    # Fewest clients per round.
    min_train_nodes: int = field(default=2, metadata=in_range(1))
    # Clients to wait for before a round.
    min_available_nodes: int = field(default=2, metadata=in_range(1))
    # Seconds to wait for a round's replies.
    round_timeout: float = field(default=3600.0, metadata=in_range(1.0))
    # How client updates are weighted: by examples (FedAvg), uniformly, or "auto":
    # uniform under client-level DP (its noise is calibrated to equal weights), else examples.
    weighting: str = field(default="auto", metadata=one_of(("auto", "examples", "uniform")))
    # The most examples one reply may count (its weight); 0: no bound but each node's own, the training
    # examples it declared when the run began.
    max_examples: int = field(default=0, metadata=in_range(0))
    # A reply's tensor may move by at most this × (its RMS + 1), as RMS per value, from what was sent; 0: off.
    max_update_ratio: float = field(default=100.0, metadata=in_range(0.0))
    # Parameters of the named strategy (each strategy reads only its own).
    proximal_mu: float = field(default=0.01, metadata=in_range(0.0))  # fedprox
    server_lr: float = field(default=0.0, metadata=in_range(0.0))  # fedadam/yogi/adagrad (0: 0.1), fedavgm (0: 1.0)
    server_momentum: float = field(default=0.9, metadata=in_range(0.0, 1.0))  # fedavgm
    beta_1: float = field(default=0.9, metadata=in_range(0.0, 1.0))  # fedadam, fedyogi
    beta_2: float = field(default=0.99, metadata=in_range(0.0, 1.0))  # fedadam, fedyogi
    tau: float = field(default=1e-3, metadata=in_range(0.0, None, lo_open=True))  # fedadam/yogi/adagrad
    trim_beta: float = field(default=0.2, metadata=in_range(0.0, 0.5))  # fedtrimmedavg
    num_malicious_nodes: int = field(default=0, metadata=in_range(0))  # krum, multikrum, bulyan
    num_nodes_to_select: int = field(default=1, metadata=in_range(1))  # multikrum
    q: float = field(default=0.1, metadata=in_range(0.0))  # qfedavg
    # What stays on each client: none, fedper (head), fedbn (norm layers), fedrep (head,
    # trained first each round), fedbabu (head frozen during federation, tuned locally at the end), fedsa-lora
    # (each client's LoRA B; A is federated).
    personalisation: str = field(default="none", metadata=one_of(STRATEGY_PERSONALISATIONS))
    head_epochs: int = field(default=1, metadata=in_range(1, 1000))  # fedrep, fedbabu: local head epochs
    # How the server merges LoRA's A and B: average (each apart, as the strategy merges every tensor); hetlora
    # (clients at their own ranks, finetune.lora-ranks: zero-padded to lora-rank, averaged, cut back for each);
    # stack (FLoRA: the exact weighted mean of the clients' B·A folded into the base weights, fresh adapters
    # each round, any ranks; the folded base weights of the adapted layers go down with them).
    lora_merge: str = field(default="average", metadata=one_of("fedtl.strategies.lora:LORA_MERGES"))


@dataclass(frozen=True)
class PrivacyConfig(Validated):
    """Differential privacy: per-sample DP-SGD on each client, or client-level DP on the server."""

    SECTION = "privacy."

    # Sample-level DP-SGD on clients, or client-level DP on the server.
    mode: str = field(default="off", metadata=one_of("fedtl.privacy:PRIVACY_MODES"))
    # Σ, when `target-epsilon` is 0.
    noise_multiplier: float = field(default=1.0, metadata=in_range(0.0, 1000.0, lo_open=True))
    # > 0: calibrate the noise so the whole planned run spends exactly this (it is also the budget).
    target_epsilon: float = field(default=0.0, metadata=in_range(0.0))
    # > 0: a client (dp-sgd) or the server (client-level) stops before spending more. 0: the target, if set.
    max_epsilon: float = field(default=0.0, metadata=in_range(0.0))
    # Δ of the guarantee.
    delta: float = field(default=1e-5, metadata=in_range(0.0, 0.1, lo_open=True))
    # dp-sgd: per-sample gradient norm bound; client-level: bound on each client's update norm.
    max_grad_norm: float = field(default=1.0, metadata=in_range(0.0, None, lo_open=True))
    # Opacus accountant (dp-sgd): rdp and prv bound epsilon; gdp approximates it (it can underestimate).
    accountant: str = field(default="rdp", metadata=one_of(("rdp", "prv", "gdp")))
    # Opacus's per-sample gradient engine; "ghost" is ghost clipping (no per-sample gradients stored).
    # Not "functorch": its vmap fails on the empty batches Poisson sampling draws.
    grad_sample_mode: str = field(default="hooks", metadata=one_of(("hooks", "ghost")))
    # client-level: Flower's wrapper family.
    clipping: str = field(default="fixed", metadata=one_of(("fixed", "adaptive")))
    # Client-level: where updates are clipped.
    clip_on: str = field(default="server", metadata=one_of(("server", "client")))
    # Adaptive clipping: share of updates to leave unclipped.
    target_quantile: float = field(default=0.5, metadata=in_range(0.0, 1.0))
    # Adaptive clipping: learning rate of the clipping norm.
    clip_lr: float = field(default=0.2, metadata=in_range(0.0, None, lo_open=True))

    @property
    def budget(self) -> float | None:
        """The epsilon nobody may exceed: ``max-epsilon``, else ``target-epsilon``, else none."""
        return self.max_epsilon or self.target_epsilon or None


@dataclass(frozen=True)
class PretrainConfig(Validated):
    """Pre-training of the built-in backbone on the scenario's source data."""

    SECTION = "pretrain."

    # Pre-training epochs on the source data.
    epochs: int = field(default=15, metadata=in_range(1, 1000))
    # Pre-training learning rate (SGD, cosine schedule).
    lr: float = field(default=0.05, metadata=in_range(0.0, 10.0, lo_open=True))
    # Pre-training batch size.
    batch_size: int = field(default=32, metadata=in_range(1))
    # Small random affine transforms while pre-training.
    augment: bool = True
    # Pre-training seed (separate from `seed`: one backbone serves every run).
    seed: int = field(default=0, metadata=in_range(0))
    # Where pre-trained weights are cached (made absolute).
    cache_dir: str = ".fedtl-cache"


@dataclass(frozen=True)
class SimulationConfig(Validated):
    """Resources of each virtual client in Flower's Ray simulation."""

    SECTION = "simulation."

    # CPUs per virtual client (Ray); 0: chosen from the machine (its cores shared by the clients of a round).
    num_cpus: float = field(default=0.0, metadata=in_range(0.0))
    # Torch threads per virtual client; 0: its CPUs, rounded (at least 1).
    threads: int = field(default=0, metadata=in_range(0))
    # GPUs per virtual client (Ray; fractions allowed).
    num_gpus: float = field(default=0.0, metadata=in_range(0.0))
    # An existing Ray cluster to run on ("auto": the one `ray start` made on this machine, or
    # "host:port" of its head); empty: a private Ray instance for this run.
    ray_address: str = ""


@dataclass(frozen=True)
class ExperimentConfig(Validated):
    """One federated transfer-learning run. Defaults are the offline default study."""

    # Run name (default folder `runs/<name>-<time>`).
    name: str = "digits"
    # Seed of the client split, head init, scratch init, batch order.
    seed: int = field(default=0, metadata=in_range(0))
    # Federated rounds.
    rounds: int = field(default=20, metadata=in_range(1, 100_000))
    # Simulated clients (SuperNodes); in a deployment, the nodes the run expects.
    clients: int = field(default=10, metadata=in_range(1, 100_000))
    # Start from the pre-trained backbone or random weights.
    init: str = field(default="pretrained", metadata=one_of(("pretrained", "scratch")))
    # Run folder (`--out` sets it).
    out: str = ""
    # Write the resume checkpoint every this many rounds, and after the last (`fedtl simulate --resume`); 0: never.
    checkpoint_every: int = field(default=1, metadata=in_range(0))
    # Where clients train and evaluate: "auto" (CUDA when this process sees a GPU), "cpu" or "cuda".
    # A node's own node config "device" overrides it.
    device: str = field(default="auto", metadata=one_of("fedtl.devices:DEVICES"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy.min_available_nodes > self.clients:
            raise ConfigError(
                f"strategy.min-available-nodes = {self.strategy.min_available_nodes} exceeds clients = "
                f"{self.clients}: the server would wait forever. Lower it or add clients."
            )
        if self.strategy.min_train_nodes > self.clients:
            raise ConfigError(
                f"strategy.min-train-nodes = {self.strategy.min_train_nodes} exceeds clients = {self.clients}. "
                "Lower it or add clients."
            )
        training = self.training_clients
        if training < 1:
            raise ConfigError(f"data.held-out-clients = {self.data.held_out_clients} leaves no client of {self.clients} "
                              "to train: hold out fewer clients or add clients")
        if self.data.held_out_clients and max(self.strategy.min_train_nodes, self.strategy.min_available_nodes) > training:
            raise ConfigError(
                f"with data.held-out-clients = {self.data.held_out_clients}, only {training} clients train, fewer than "
                f"strategy.min-train-nodes / min-available-nodes ({self.strategy.min_train_nodes} / "
                f"{self.strategy.min_available_nodes}): lower those or hold out fewer clients"
            )
        if self.data.canaries and self.data.canary_client >= training:
            raise ConfigError(f"data.canary-client = {self.data.canary_client} is not a training client (0 to "
                              f"{training - 1}): the canaries would never be trained on; name one of those")
        p = self.privacy
        if p.max_epsilon and p.target_epsilon and p.max_epsilon < p.target_epsilon:
            raise ConfigError(
                f"privacy.max-epsilon = {p.max_epsilon} is below privacy.target-epsilon = {p.target_epsilon}: the run "
                "could not finish its plan. Raise max-epsilon or lower target-epsilon (or leave max-epsilon at 0)."
            )
        if self.finetune.batchnorm == AUTO:  # resolved once, so config.toml records what the run does
            object.__setattr__(self, "finetune", dataclasses.replace(self.finetune, batchnorm=self._auto_batchnorm()))
        for check in entry_checks(self):  # what the chosen privacy mode, strategy and personalisation refuse
            check(self)

    def _auto_batchnorm(self) -> str:
        """``finetune.batchnorm = "auto"``: the personalisation's own policy (FedBN: local), else batch statistics
        from scratch, else the mode's own (bn-only: batch), else frozen statistics (fedtl.batchnorm)."""
        own = registry_entry(STRATEGY_PERSONALISATIONS, self.strategy.personalisation).batchnorm
        if own is None and self.init == "scratch":
            own = "batch"
        return own or registry_entry(FINETUNE_MODES, self.finetune.mode).batchnorm or "frozen"

    @property
    def training_clients(self) -> int:
        """Clients that train: all but the held-out ones."""
        return self.clients - self.data.held_out_clients

    @property
    def sampled_clients(self) -> int:
        """Clients the strategy samples each round when all training clients are available (Flower's rule)."""
        n = self.training_clients
        return min(n, max(int(n * self.strategy.fraction_train), self.strategy.min_train_nodes))

    # -- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested dict with kebab-case keys, as in the TOML file."""
        return to_dict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML text (what a run folder's ``config.toml`` holds)."""
        return tomli_w.dumps(self.to_dict())

    def to_run_config(self) -> dict[str, Scalar]:
        """Flatten into Flower's ``run_config`` (``"finetune.mode": "full"``)."""
        return flatten(self.to_dict())

    @classmethod
    def from_run_config(cls, run_config: typing.Mapping[str, Any]) -> ExperimentConfig:
        """Parse a flattened Flower ``run_config`` back into a config (inverse of ``to_run_config``)."""
        return typing.cast(ExperimentConfig, build(cls, unflatten(dict(run_config)), cls))

    def as_scratch(self) -> ExperimentConfig:
        """The from-scratch baseline of this run: random init, every block trained at the head's lr, a seeded
        random head (a head start needs pre-trained features), BatchNorm as ``auto`` chooses from scratch (batch
        statistics, merged: how the architecture trains from random init). It trains no LoRA, so how LoRA is
        merged (and a personalisation of LoRA's tensors, FedSA-LoRA: ``lora_only``) goes back to the default."""
        finetune = dataclasses.replace(self.finetune, mode="full", backbone_lr_scale=1.0, head_init="random",
                                       lora_ranks="", batchnorm=AUTO)
        lora_only = getattr(registry_entry(STRATEGY_PERSONALISATIONS, self.strategy.personalisation), "lora_only",
                            False)
        strategy = dataclasses.replace(self.strategy, lora_merge="average",
                                       personalisation="none" if lora_only else self.strategy.personalisation)
        return dataclasses.replace(self, init="scratch", finetune=finetune, strategy=strategy)

    def replace(self, **changes: Any) -> ExperimentConfig:
        """Copy with top-level fields changed (validated on construction)."""
        return dataclasses.replace(self, **changes)
