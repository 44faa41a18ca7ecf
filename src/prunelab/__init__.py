"""prunelab: compare static and dynamic neural-network pruning under one roof."""

__version__ = "0.1.0"
