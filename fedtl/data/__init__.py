"""Data: scenarios (source for pre-training, target for federated fine-tuning), styles, partitioning.

Importing the package registers every scenario family in ``fedtl.data.scenarios.SCENARIOS``.
"""

from fedtl.data import digits, node_files, photographs, sources, text  # noqa: F401 - importing registers the families
