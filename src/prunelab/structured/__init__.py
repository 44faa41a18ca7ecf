"""Structured pruning core (pure torch): channel groups, compaction, residual-block removal.

- :func:`channel_groups` — the coupled channel groups of a model, from Torch-Pruning's
  dependency graph (Fang et al. 2023, "DepGraph: Towards Any Structural Pruning", CVPR);
  :func:`removable_channels`, :func:`structured_masks` and :func:`channel_norms` turn them into
  masks and scores;
- :func:`compact` / :func:`compact_with_report` — a physically smaller dense copy of a model
  without the channels its masks prune whole, equal to the masked model in eval mode (the
  constants removed channels leave behind are folded into the next layers);
- :func:`residual_blocks` / :func:`remove_blocks` — replace whole residual blocks by their
  shortcuts (plus the constant a masked branch still outputs, :class:`ChannelBias`);
  :func:`compact_with_blocks` — compaction that also removes the blocks whose residual
  branch the masks prune whole (:func:`masked_blocks`, :func:`branch_parameters`).

No Lightning or Hydra here: pruning methods call these functions on plain modules.
"""

from prunelab.structured.blocks import (
    SHORTCUT_KINDS,
    SHORTCUT_MODULES,
    ChannelBias,
    branch_constant,
    branch_parameters,
    compact_with_blocks,
    masked_blocks,
    remove_blocks,
    residual_blocks,
)
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
    "SHORTCUT_MODULES",
    "BiasMapConv1d",
    "BiasMapConv2d",
    "BiasMapConv3d",
    "ChannelBias",
    "ChannelGroup",
    "CompactionReport",
    "LayerChannels",
    "Slice",
    "branch_constant",
    "branch_parameters",
    "channel_groups",
    "channel_norms",
    "compact",
    "compact_with_blocks",
    "compact_with_report",
    "masked_blocks",
    "removable_channels",
    "residual_blocks",
    "remove_blocks",
    "structured_masks",
]
