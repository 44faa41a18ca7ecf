"""One-shot magnitude pruning: train dense, prune once, fine-tune with the mask fixed."""

from prunelab.methods.base import MagnitudePruning


class StaticMagnitude(MagnitudePruning):
    """Han et al. 2015, "Learning both weights and connections for efficient neural networks".

    Dense training until the schedule's pruning step (``schedule.at``: a fraction of training,
    or ``schedule.at_epoch``), then the smallest-magnitude weights are removed at once —
    over all layers with one threshold (``distribution=global``) or per layer by another
    distribution — and the rest of training fine-tunes the surviving weights.

    ``distribution.n_m=N:M`` (with ``sparsity=1-N/M``) prunes every group of M consecutive
    weights along the input dimension to its N largest magnitudes instead;
    ``distribution.block=RxC`` keeps whole ``R x C`` blocks of each layer's
    ``[out, in * kh * kw]`` matrix, the ``round(keep / (R * C))`` with the largest L2 norm
    (``keep``: the layer's count from the distribution), so each layer ends within one block
    of its budget; ``pruning.threshold`` prunes ``|w| < θ`` instead, ``θ`` absolute or times each layer's
    weight std (``pruning.threshold_mode``), and ``sparsity`` is then ignored (see
    :class:`~prunelab.methods.base.MagnitudePruning`).
    """

    name = "static"
    schedule_kinds = ("one_shot",)
