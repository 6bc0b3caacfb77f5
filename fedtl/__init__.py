"""fedtl: federated transfer learning on Flower.

Every client fine-tunes the same pre-trained backbone on its own data; only the
tensors someone trains travel between clients and server.
"""

__version__ = "0.1.0"
