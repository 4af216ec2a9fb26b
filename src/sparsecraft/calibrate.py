"""Former home of the calibrated driver; kept so existing imports keep working.

Blocks and calibration inputs now live in :mod:`sparsecraft.blocks`, the block-by-block
driver in :mod:`sparsecraft.oneshot.driver`.
"""

from __future__ import annotations

from .blocks import (
    BlockBatch,
    available_memory,
    block_targets,
    capture_block_inputs,
    check_calibration,
    find_blocks,
    run_block,
)
from .oneshot.driver import calibrated_prune

# the old private names, for code written against the previous module
_run_block = run_block
_block_targets = block_targets
_available_memory = available_memory

__all__ = ["BlockBatch", "find_blocks", "capture_block_inputs", "calibrated_prune", "check_calibration"]
