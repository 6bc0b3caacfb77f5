"""The run folder's contract: every file name a run writes and every key its records hold.

A run's folder is read back by others than its writer: reports, comparisons, studies, audits,
a resumed run, a new run seeded from a checkpoint. Every file and folder name of a run folder
(and of a study folder), every key of a ``metrics.jsonl`` row and of ``summary.json`` that anyone
reads is named here once, as the wire's names are in ``fedtl.protocol``; a literal copy of one
of these strings anywhere else in the package is a bug (``tests/unit/test_protocol.py`` holds
that for the names with a ``_`` or a ``.``: plain words such as ``"round"``, ``"accuracy"`` or
``"loss"`` may stay literals). ``clients.jsonl`` rows are a node's reply metrics, named by
``fedtl.protocol``; ``privacy.jsonl`` rows are written and read by ``fedtl.server.ledger`` alone.

Constants only: no torch, no Flower, no fedtl import, so that anything reading a run imports it cheaply.
"""

from __future__ import annotations

# -- files and folders of a run folder --------------------------------------------------
CONFIG_FILE = "config.toml"  # the resolved ExperimentConfig (a resumed run's own config)
METRICS_FILE = "metrics.jsonl"  # one row per round, round 0 = before training (keys below)
SUMMARY_FILE = "summary.json"  # the run's summary (keys below), written as it ends
ACCURACY_PLOT = "accuracy.png"  # test accuracy per round (pre-trained vs scratch with a baseline)
MERGE_ERROR_PLOT = "lora_merge_error.png"  # LoRA's merge error per round and layer, where measured
CHECKPOINTS_DIR = "checkpoints"  # the folder of the three checkpoints below
LAST_CHECKPOINT = "last.safetensors"  # the latest round's full model (metadata: round, accuracy, fingerprint)
BEST_CHECKPOINT = "best.safetensors"  # the best trained round's full model (same metadata)
RESUME_FILE = "resume.safetensors"  # what the server needs to continue the run (fedtl.server.checkpoint)
LEDGER_FILE = "privacy.jsonl"  # the privacy ledger, one row per client and round (fedtl.server.ledger)
PRIVACY_PLOT = "privacy.png"  # the ledger's plot
CLIENTS_FILE = "clients.jsonl"  # every node's evaluation of the final model (protocol's reply-metric names)
LOG_FILE = "flower.log"  # Flower's and Ray's log lines
NODE_STATE_DIR = "node-state"  # a simulated run's node states, for a resume (fedtl.simulations.node_state)
SCRATCH_DIR = "scratch"  # the from-scratch baseline's own run folder (``--compare-scratch``)
# What a run writes into its folder (and ``--overwrite`` removes, with SCRATCH_DIR).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, ACCURACY_PLOT, CHECKPOINTS_DIR, LEDGER_FILE, PRIVACY_PLOT,
             CLIENTS_FILE, LOG_FILE, NODE_STATE_DIR, MERGE_ERROR_PLOT)

# -- a study folder ------------------------------------------------------------------------
PLAN_FILE = "plan.json"  # the study's runs (fedtl.simulations.study.write_plan)
STUDY_FILE = "study.toml"  # a copy of the study file it ran
# Keys of ``plan.json`` (and of each of its runs).
PLAN_TARGET_ACCURACY = "target_accuracy"  # the accuracy the efficiency columns count up to (0: derived)
PLAN_SCRATCH_DIR = "scratch_dir"  # a run's baseline folder, relative to the study's; null without one

# -- keys of a ``metrics.jsonl`` row (besides "round" and the central evaluation's "accuracy", "loss", "ece",
# "accuracy/<style>", and "epsilon" when accounted) ----------------------------------------
BYTES_DOWN = "bytes_down"  # bytes the round sent to clients
BYTES_UP = "bytes_up"  # bytes the clients' replies carried back
CLIENTS_OK = "clients_ok"  # updates merged
CLIENTS_FAILED = "clients_failed"  # error replies, refused updates, timeouts
CLIENTS_DECLINED = "clients_declined"  # clients whose privacy gate declined the round
ROUND_TRAIN_LOSS = "train_loss"  # the strategy's aggregate of the replies' protocol.TRAIN_LOSS
CLIENT_ERRORS = "client_errors"  # why each failed client's update was not merged
LORA_MERGE_ERROR = "lora_merge_error"  # LoRA: the merge error, mean over adapted layers ...
LORA_MERGE_ERROR_LAYERS = "lora_merge_error_layers"  # ... and per layer
TRAVELLING_PARAMS = "travelling_params"  # elements of the round's travelling tensors (also a summary key)
WALL_SECONDS = "wall_seconds"  # the run's clock at the row (the summary's: at its end)

# -- keys of ``summary.json`` (besides plain words: "schema", "name", "mode", "init", "backbone", "strategy",
# "clients", "rounds", "personalisation", "privacy") ------------------------------------------
FINAL_ACCURACY = "final_accuracy"  # the last round's test accuracy (also an audit level's key)
FINAL_LOSS = "final_loss"
FINAL_ACCURACY_PER_STYLE = "final_accuracy_per_style"  # style -> the last round's accuracy on it
BEST_ACCURACY = "best_accuracy"  # the best trained round's accuracy ...
BEST_ROUND = "best_round"  # ... and that round
INITIAL_ACCURACY = "initial_accuracy"  # round 0's: the model before any training
BYTES_DOWN_TOTAL = "bytes_down_total"  # BYTES_DOWN summed over rounds
BYTES_UP_TOTAL = "bytes_up_total"  # BYTES_UP summed over rounds
OUT_DIR = "out_dir"  # the run folder
TOTAL_PARAMS = "total_params"  # elements of the whole model (adapters excluded)
TRAVELLING_BYTES = "travelling_bytes"  # bytes of the last round's travelling tensors ...
MODEL_BYTES = "model_bytes"  # ... against the whole model's ...
TRAVELLING_RATIO = "travelling_ratio"  # ... and their ratio
LOCAL_KEYS = "local_keys"  # how many tensors a personalisation keeps on the clients
BACKBONE_FINGERPRINT = "backbone_fingerprint"  # the backbone's fingerprint (also in each checkpoint's metadata)
HEAD_INIT = "head_init"  # finetune.head-init
STOPPED_EARLY = "stopped_early"  # why the run stopped before its last round, or null
# Added by a run with its baseline (``--compare-scratch``).
SCRATCH_FINAL_ACCURACY = "scratch_final_accuracy"
SCRATCH_BEST_ACCURACY = "scratch_best_accuracy"
TRANSFER_GAIN = "transfer_gain"  # FINAL_ACCURACY minus the baseline's
# The clients' final evaluation (fedtl.server.record.client_summary).
PER_CLIENT = "per_client"  # training clients: "ids", "accuracy" and "personal" (one value each), their fairness
# The fairness figures of a per-client list "accuracy" or "personal": "<name>" + suffix.
MEAN_SUFFIX = "_mean"  # the mean over clients
STD_SUFFIX = "_std"  # the standard deviation over clients
WORST10_SUFFIX = "_worst10"  # the mean of the worst 10 % of clients
PER_CLIENT_ACCURACY_MEAN = "accuracy_mean"
PER_CLIENT_ACCURACY_WORST10 = "accuracy_worst10"
PER_CLIENT_PERSONAL_MEAN = "personal_mean"
PER_CLIENT_PERSONAL_WORST10 = "personal_worst10"
HELD_OUT_CLIENTS = "held_out"  # clients held out of training: "ids" and ...
HELD_OUT_BEFORE = "accuracy_before"  # ... each one's accuracy before it adapts the model ...
HELD_OUT_AFTER = "accuracy_after"  # ... and after
HELD_OUT_BEFORE_MEAN = "accuracy_before_mean"
HELD_OUT_AFTER_MEAN = "accuracy_after_mean"
EVALUATION_DECLINED = "evaluation_declined"  # client -> why its privacy gate declined the final evaluation
FINAL_EVALUATION = "final_evaluation"  # the final per-client evaluation: "asked" nodes of all "nodes" (a sample
# when there are more than strategy.evaluate-clients)
# The "privacy" section (fedtl.server.ledger.PrivacyLedger.summary; besides "mode", "level", "delta", "budget",
# "accountant", "guarantee").
EPSILON_MAX = "epsilon_max"  # the largest epsilon any client (client-level: the run) spent; null: infinite
EPSILON_MAX_BY_ACCOUNTANT = "epsilon_max_by_accountant"  # "rdp" / "prv" / "gdp" -> the largest client's
EPSILON_MAX_TIGHTEST = "epsilon_max_tightest"  # every client's smaller of RDP and PRV, the largest over clients
ACCOUNTANTS_SKIPPED = "accountants_skipped"  # accountant -> why it stated nothing
EPSILON_REPLACE_ONE = "epsilon_replace_one"  # the largest epsilon under replace-one adjacency
EPSILON_PER_CLIENT = "epsilon_per_client"  # client -> its epsilon
CLIENTS_OUT_OF_BUDGET = "clients_out_of_budget"  # clients that declined once their budget was spent
CLIENTS_SPEND_UNKNOWN = "clients_spend_unknown"  # clients sent training whose spend cannot be counted
