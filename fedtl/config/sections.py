"""The sections of an ExperimentConfig (``schema.py``): one validated frozen dataclass each.

Each field's comment is its description in the configuration reference (``reference.py``,
``docs/config.md``). A value that a registry names (a backbone, a mode, a strategy) is checked
against the registry's catalogue (``catalogue.py``), which imports no registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtl.batchnorm import AUTO, BATCHNORM
from fedtl.config import catalogue
from fedtl.config.fields import ConfigError, Validated, in_range, one_of

# finetune.batchnorm: "auto" or a policy of fedtl.batchnorm (torch-free data, beside the config).
BATCHNORM_CHOICES = (AUTO, *BATCHNORM.names())


@dataclass(frozen=True)
class DataConfig(Validated):
    """Where each client's data comes from and how it is split."""

    SECTION = "data."

    # The data (docs/data-and-backbones.md; `nodes`: data on the SuperNodes, docs/deploy.md).
    scenario: str = field(default="digits-domain-shift", metadata=one_of(catalogue.SCENARIOS))
    # Flwr-datasets partitioner of the target pool (`natural`: client folders).
    partitioner: str = field(default="iid", metadata=one_of(catalogue.PARTITIONERS))
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
    augment: str = field(default="none", metadata=one_of(catalogue.AUGMENTATIONS))
    # The privacy audit's planted canaries (a file `fedtl audit` writes): extra training images of one client.
    canaries: str = ""
    canary_client: int = field(default=0, metadata=in_range(0))  # The partition that trains on the canaries.


@dataclass(frozen=True)
class ModelConfig(Validated):
    """Which backbone every client fine-tunes."""

    SECTION = "model."

    # Backbone family.
    backbone: str = field(default="small-cnn", metadata=one_of(catalogue.BACKBONES))
    # "group" swaps every BatchNorm for GroupNorm (Opacus's ModuleValidator.fix) before
    # pre-training, so normalisation layers can train under DP-SGD.
    norm: str = field(default="native", metadata=one_of(catalogue.NORMS))
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
    mode: str = field(default="feature-extraction", metadata=one_of(catalogue.MODES))
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
    head_init: str = field(default="random", metadata=one_of(catalogue.HEAD_INITS))
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


@dataclass(frozen=True)
class StrategyConfig(Validated):
    """How the server samples clients and merges what they trained."""

    SECTION = "strategy."

    # Flower strategy (docs/concepts.md).
    name: str = field(default="fedavg", metadata=one_of(catalogue.STRATEGIES))
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
    # examples it declared when it was first sampled.
    max_examples: int = field(default=0, metadata=in_range(0))
    # A reply's tensor may move by at most this × (its RMS + 1), as RMS per value, from what was sent; 0: off.
    max_update_ratio: float = field(default=100.0, metadata=in_range(0.0))
    # Nodes that evaluate the final model on their own test data (`clients.jsonl`, the per-client figures):
    # all when there are at most this many, else a sample of this many drawn from `seed`; 0: every node.
    evaluate_clients: int = field(default=1000, metadata=in_range(0))
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
    personalisation: str = field(default="none", metadata=one_of(catalogue.PERSONALISATIONS))
    head_epochs: int = field(default=1, metadata=in_range(1, 1000))  # fedrep, fedbabu: local head epochs
    # How the server merges LoRA's A and B: average (each apart, as the strategy merges every tensor); hetlora
    # (clients at their own ranks, finetune.lora-ranks: zero-padded to lora-rank, averaged, cut back for each);
    # stack (FLoRA: the exact weighted mean of the clients' B·A folded into the base weights, fresh adapters
    # each round, any ranks; the folded base weights of the adapted layers go down with them).
    lora_merge: str = field(default="average", metadata=one_of(catalogue.LORA_MERGES))


@dataclass(frozen=True)
class PrivacyConfig(Validated):
    """Differential privacy: per-sample DP-SGD on each client, or client-level DP on the server."""

    SECTION = "privacy."

    # Sample-level DP-SGD on clients, or client-level DP on the server.
    mode: str = field(default="off", metadata=one_of(catalogue.PRIVACY_MODES))
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
