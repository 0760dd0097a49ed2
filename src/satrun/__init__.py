"""satrun: Sparsity-Accelerated Training (SAT) for large language models."""

__version__ = "0.1.0"
