"""fedtl: federated transfer learning on Flower.

Every client fine-tunes the same pre-trained backbone on its own data; only the
tensors someone trains travel between clients and server.
"""

from fedtl.offline import apply_offline_environment

# Before any fedtl module imports flwr, which reads its telemetry switch at import.
apply_offline_environment()

__version__ = "0.1.0"
