"""Hardware cost of a pruned model: FLOPs, training FLOPs, sizes, latency, energy, export.

Pure torch (no Lightning, no Hydra). One module per concern:

- :mod:`.flops` — dense per-layer FLOPs measured with torch's FLOP counter, scaled by density;
- :mod:`.training` — training FLOPs per method (Evci et al. 2020, appendix H);
- :mod:`.size` — parameter counts, compression ratio, bytes in dense/CSR/bitmask/int8 formats;
- :mod:`.latency` — measured latency and peak memory of dense/masked/sparse/compact models;
- :mod:`.energy` — an energy estimate from Horowitz (2014)'s 45 nm table;
- :mod:`.export` — state dict, compact sparse checkpoint, ONNX;
- :func:`dynamic_cost_report` (:mod:`prunelab.dynamic.report`) — what an input-adaptive
  (gated) model spends per input, and its measured batch-1 dynamic-execution latency.

:func:`cost_report` gathers them into one flat dict for the results record and W&B.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunelab.cost import latency as _latency
from prunelab.cost.energy import energy_report
from prunelab.cost.export import export_all, load_sparse_checkpoint, save_sparse_checkpoint
from prunelab.cost.flops import (
    LayerFlops,
    densities_of,
    inference_report,
    layer_flops,
    sparse_forward_flops,
)
from prunelab.cost.latency import (
    build_sparse_model,
    compact_linear_chain,
    dense_copy,
    measure_latency,
)
from prunelab.cost.size import size_report
from prunelab.cost.training import (
    METHOD_ACCOUNTING,
    accounting_for,
    dense_training_flops,
    segments_from_history,
    training_flops,
    training_flops_x_dense,
)
from prunelab.dynamic.report import dynamic_cost_report
from prunelab.errors import ConfigError
from prunelab.models import prunable_parameters

if TYPE_CHECKING:
    from prunelab.structured import CompactionReport

log = logging.getLogger(__name__)


def cost_report(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    input_shape: Sequence[int],
    history: Sequence[Mapping[str, Any]] | None = None,
    total_steps: int | None = None,
    samples_per_step: int | None = None,
    method_name: str | None = None,
    update_every: int | None = None,
    measure_latency: bool = True,
    latency_batch_sizes: Sequence[int] = (1, 256),
    latency_repeats: int = 15,
    latency_under_load: bool = False,
    dense_flops: LayerFlops | None = None,
    latency_mode: str = "full",
) -> dict[str, float | None]:
    """Every cost of ``model`` pruned by ``masks`` (``None``: its zeros), as a flat dict.

    ``input_shape`` is one sample's shape (no batch dimension). Inference densities are those
    of the effective weights (kept by the mask and non-zero). Keys (per sample unless said):

    - ``flops_infer_dense`` / ``flops_infer_sparse``: forward FLOPs, as torch's counter counts
      them (2 per MAC of a conv/linear; element-wise ops 0); sparse = layer FLOPs x density
      (:mod:`.flops`); ``macs_infer_dense`` / ``macs_infer_sparse`` = FLOPs / 2;
      ``macs_prunable_dense`` / ``macs_prunable_sparse``: the prunable layers alone;
    - ``theoretical_speedup`` = dense / sparse forward FLOPs (ShrinkBench);
    - ``density_prunable``: kept fraction of the prunable weights;
    - ``flops_train``: total training FLOPs by the method's appendix-H rule (:mod:`.training`)
      from the engine ``history`` (per-update densities) over ``total_steps`` steps of
      ``samples_per_step`` samples; ``flops_train_dense``: the dense run,
      ``3 f_D x samples x steps``; ``flops_train_x_dense`` = their ratio. Present only when
      ``total_steps``, ``samples_per_step`` and ``method_name`` are given. Without
      ``history`` the final densities are taken as constant over training (exact for dense
      and fixed masks; for RigL ``update_every`` then applies the paper's average; GMP and
      one-shot need the history);
    - ``params_total``, ``params_nonzero``, ``params_prunable``, ``params_prunable_nonzero``,
      ``compression_ratio`` = total / non-zero parameters (ShrinkBench);
    - ``bytes_dense_fp32``, ``bytes_csr``, ``bytes_bitmask``, ``bytes_int8_sparse``: stored
      sizes of the parameters (:mod:`.size`);
    - ``energy_uj_estimate_dense`` / ``_sparse`` (+ ``_compute``/``_weights``/``_activations``
      parts, ``energy_ratio_estimate``): Horowitz-table estimate, batch 1, sparse weights read
      in CSR (:mod:`.energy`);
    - when the masks prune whole channels/neurons (an output row all masked) and the model
      can be compacted (:func:`structured_compaction`): ``bytes_compact_fp32`` (its state
      dict's tensors: parameters and buffers), ``params_compact`` (parameters of
      the physically smaller model), ``flops_infer_compact`` / ``macs_infer_compact`` (its
      dense forward cost, counted by the FLOP counter on the compacted model),
      ``compact_speedup`` = dense / compacted forward FLOPs, ``channels_removed`` (how
      many channels compaction removed) and ``blocks_removed`` (how many residual blocks,
      whose branch the masks prune whole, it removed);
    - with ``measure_latency``: ``latency_ms/<variant>/b<batch>`` and
      ``peak_tensor_alloc_mb/...`` (CPU) or ``peak_cuda_alloc_mb/...`` (CUDA) for variants
      ``dense``, ``masked``, ``sparse`` (CSR Linear layers) and ``compact``: the structurally
      compacted model above when there is one, else, for Linear chains, the chain without its
      dead neurons (:mod:`.latency`); median over ``latency_repeats`` blocks. ``dense`` is
      the same architecture with its pruned entries refilled (:func:`.latency.dense_copy`),
      not the pruned model. ``latency_threads``: torch's intra-op threads during the timing;
      ``latency_under_load``: the caller's ``latency_under_load``, true when other jobs (a
      parallel sweep) may have shared the machine while it was timed, so the numbers are
      not those of an idle machine. ``latency_mode``: ``full`` times each variant and batch
      size as :func:`.latency.latency_report` does by default (``latency_repeats`` blocks of
      at least 10 ms each, the sparse kernels tuned per layer); ``quick`` times
      ``QUICK_REPEATS`` blocks of at least ``QUICK_MIN_BLOCK_S`` each with the plain CSR
      kernels, about a tenth of the time, at the price of a wider spread
      (``latency_mode`` is recorded).

    ``dense_flops``: the model's dense per-layer FLOPs from an earlier :func:`layer_flops`
    call on the same model and prunable parameters (they do not depend on the masks), so
    the counter need not run twice.
    """
    params_all = dict(model.named_parameters())
    if masks is not None:
        unknown = [n for n in masks if n not in params_all]
        if unknown:
            raise ConfigError(f"masks name parameters the model does not have: {unknown[:3]}")
        params = {n: params_all[n] for n in masks}
    else:
        params = prunable_parameters(model)
    lf = dense_flops if dense_flops is not None else layer_flops(model, input_shape, params=params)
    densities = densities_of(params, masks)
    report: dict[str, Any] = dict(inference_report(lf, densities))
    numel = sum(p.numel() for p in params.values())
    report["density_prunable"] = (
        sum(densities[n] * p.numel() for n, p in params.items()) / numel if numel else 1.0
    )
    report.update(size_report(model, masks if masks is not None else None))
    report.update(
        energy_report(
            lf,
            report["macs_infer_dense"],
            report["macs_infer_sparse"],
            report["bytes_dense_fp32"],
            report["bytes_csr"],
        )
    )
    if total_steps is not None and samples_per_step is not None and method_name is not None:
        accounting = accounting_for(method_name)
        if history:
            segments = segments_from_history(history, total_steps)
        elif accounting in ("gradual", "one_shot"):
            raise ConfigError(
                f"training FLOPs of '{method_name}' need the sparsity history (engine.history)"
            )
        else:
            segments = [(int(total_steps), densities, None)]
        flops = training_flops(lf, segments, samples_per_step, accounting, update_every)
        report["flops_train"] = flops
        report["flops_train_dense"] = dense_training_flops(lf, samples_per_step, total_steps)
        report["flops_train_x_dense"] = training_flops_x_dense(
            flops, lf, samples_per_step, total_steps
        )
    compacted = structured_compaction(model, masks, input_shape)
    if compacted is not None:
        net, compaction = compacted
        flops_compact = layer_flops(net, input_shape).total
        report["params_compact"] = sum(p.numel() for p in net.parameters())
        report["bytes_compact_fp32"] = sum(
            t.numel() * t.element_size() for t in net.state_dict().values()
        )
        report["flops_infer_compact"] = flops_compact
        report["macs_infer_compact"] = flops_compact / 2
        report["compact_speedup"] = lf.total / flops_compact if flops_compact else None
        report["channels_removed"] = compaction.channels_removed
        report["blocks_removed"] = len(compaction.blocks_removed)
    if measure_latency:
        if latency_mode not in LATENCY_MODES:
            raise ConfigError(f"latency_mode={latency_mode!r}: choose {' or '.join(LATENCY_MODES)}")
        quick = latency_mode == "quick"
        # the quick mode times the untuned kernels; ``full`` auto-tunes each layer (cached)
        options: dict[str, Any] = (
            {"repeats": QUICK_REPEATS, "min_block_s": QUICK_MIN_BLOCK_S, "autotune": False}
            if quick
            else {"repeats": latency_repeats}
        )
        report.update(
            _latency.latency_report(
                model,
                masks,
                input_shape,
                latency_batch_sizes,
                compacted=compacted[0] if compacted is not None else None,
                **options,
            )
        )
        report["latency_under_load"] = bool(latency_under_load)
        report["latency_mode"] = latency_mode
    return report


LATENCY_MODES = ("quick", "full")
# The quick latency mode: a few short blocks per variant and batch size.
QUICK_REPEATS = 3
QUICK_MIN_BLOCK_S = 0.002


def structured_compaction(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None, input_shape: Sequence[int]
) -> tuple[nn.Module, CompactionReport] | None:
    """The model without the residual blocks whose branch ``masks`` prune whole and without
    the channels/neurons they prune whole (:func:`prunelab.structured.compact_with_blocks`:
    the blocks are replaced by their shortcut plus the constant the masked branch outputs,
    then the channels are removed; checked against the masked model) and its report
    (``blocks_removed`` names the removed blocks), or ``None`` when no prunable weight has a
    fully masked output row, when compaction removes nothing, or when the model cannot be
    compacted (a model the dependency graph cannot trace or mis-couples: its cost is then
    reported without the compacted figures)."""
    if masks is None:
        masks = {n: p.detach() != 0 for n, p in prunable_parameters(model).items()}
    if not any(
        bool((~m.reshape(m.shape[0], -1).any(dim=1)).any()) for m in masks.values() if m.dim()
    ):
        return None
    # Imported here: it needs Torch-Pruning, and most masks prune no whole row.
    from prunelab.structured import compact_with_blocks

    try:
        with torch.random.fork_rng(devices=[]):
            net, compaction = compact_with_blocks(model, masks, input_shape)
    except ConfigError as err:
        log.info("no compacted cost: %s", err)
        return None
    if not compaction.changed:
        return None
    return net, compaction


__all__ = [
    "METHOD_ACCOUNTING",
    "LayerFlops",
    "accounting_for",
    "build_sparse_model",
    "compact_linear_chain",
    "cost_report",
    "dense_copy",
    "dense_training_flops",
    "densities_of",
    "dynamic_cost_report",
    "energy_report",
    "export_all",
    "inference_report",
    "layer_flops",
    "load_sparse_checkpoint",
    "measure_latency",
    "save_sparse_checkpoint",
    "segments_from_history",
    "structured_compaction",
    "size_report",
    "sparse_forward_flops",
    "training_flops",
    "training_flops_x_dense",
]
