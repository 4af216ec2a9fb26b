"""Feature selection with sparse networks: :class:`QuickSelection` (scikit-learn-like)."""

from .quickselection import QuickSelection, SparseLinear

__all__ = ["QuickSelection", "SparseLinear"]
