"""fedprune: federated adaptation of transformer language models with structured sparsity."""

__version__ = "0.1.0"
