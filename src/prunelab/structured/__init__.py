"""Structured pruning core (pure torch): channel groups, compaction, residual-block removal.

- :func:`channel_groups` — the coupled channel groups of a model, from Torch-Pruning's
  dependency graph (Fang et al. 2023, "DepGraph: Towards Any Structural Pruning", CVPR);
  :func:`removable_channels`, :func:`structured_masks` and :func:`channel_norms` turn them into
  masks and scores;
- :func:`compact` / :func:`compact_with_report` — a physically smaller dense copy of a model
  without the channels its masks prune whole, equal to the masked model in eval mode (the
  constants removed channels leave behind are folded into the next layers);
- :func:`residual_blocks` / :func:`remove_blocks` — replace whole residual blocks by their
  shortcuts.

No Lightning or Hydra here: pruning methods call these functions on plain modules.
"""

from prunelab.structured.blocks import SHORTCUT_KINDS, remove_blocks, residual_blocks
from prunelab.structured.compaction import (
    BiasMapConv1d,
    BiasMapConv2d,
    BiasMapConv3d,
    CompactionReport,
    LayerChannels,
    compact,
    compact_with_report,
)
from prunelab.structured.groups import (
    ChannelGroup,
    Slice,
    channel_groups,
    channel_norms,
    removable_channels,
    structured_masks,
)

__all__ = [
    "SHORTCUT_KINDS",
    "BiasMapConv1d",
    "BiasMapConv2d",
    "BiasMapConv3d",
    "ChannelGroup",
    "CompactionReport",
    "LayerChannels",
    "Slice",
    "channel_groups",
    "channel_norms",
    "compact",
    "compact_with_report",
    "removable_channels",
    "residual_blocks",
    "remove_blocks",
    "structured_masks",
]
