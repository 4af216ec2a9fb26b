"""Former home of the calibrated driver; kept so existing imports keep working.

Blocks and calibration inputs now live in :mod:`sparsecraft.blocks`, the block-by-block
driver in :mod:`sparsecraft.oneshot.driver`.
"""

from __future__ import annotations

from .blocks import BlockBatch, capture_block_inputs, check_calibration, find_blocks
from .oneshot.driver import calibrated_prune

__all__ = ["BlockBatch", "find_blocks", "capture_block_inputs", "calibrated_prune", "check_calibration"]
