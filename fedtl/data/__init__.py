"""Data: scenarios (source for pre-training, target for federated fine-tuning), styles, partitioning."""

DATA_PATH = "data-path"  # the node config key naming a SuperNode's own data (light: fedtl deploy imports it)
