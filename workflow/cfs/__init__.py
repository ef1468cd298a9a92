"""cfs: context-free synthetic data against forgetting, one module per pipeline stage."""

__version__ = "0.1.0"
