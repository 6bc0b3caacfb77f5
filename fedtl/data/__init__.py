"""Data: scenarios (source for pre-training, target for federated fine-tuning), styles, partitioning."""
