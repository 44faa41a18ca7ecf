"""The cost of a gated model as it runs: MACs actually spent per input, their distribution,
and measured batch-1 latency of dynamic execution against the dense model.

Pure torch. :func:`dynamic_cost_report` returns flat keys for the run's ``cost`` record (and
W&B's ``cost/`` namespace), all per input:

- ``macs_dynamic_mean`` / ``_p50`` / ``_p90`` / ``_p99`` / ``_min`` / ``_max``: MACs spent
  (convs and Linears over the executed channels, predictors included) over ``samples``
  inputs (the test split by default), derived from the executed channel counts the gates
  record (:meth:`prunelab.dynamic.plan.Plan.macs`, the same count the executor makes);
  ``macs_dynamic_dense``: every channel computed, no predictors (the dense model's conv and
  Linear MACs); ``macs_dynamic_predictors``: the predictors' share; ``macs_dynamic_x_dense``:
  dense / mean; ``dynamic_density_mean``: the mean fraction of gated channels executed;
  ``dynamic_density_layers``: the same per gated conv; ``dynamic_samples``;
- ``latency_ms/dense_plain/b1``, ``latency_ms/gated_masked/b1``, ``latency_ms/dynamic/b1``:
  batch-1 latency (ms per input) of the model without gates, of the gated model computing
  every channel and zeroing the suppressed ones, and of :class:`~prunelab.dynamic.executor.
  DynamicExecutor`, over the same ``latency_samples`` inputs, timed as
  :mod:`prunelab.cost.latency` times (warm-up, ``torch.inference_mode``, median of blocks)
  in ``latency_rounds`` alternating rounds, the median over the rounds;
  ``dynamic_speedup_b1`` = dense / dynamic; ``dynamic_max_abs_diff``: the largest logit
  difference between the executor and the gated model on those inputs;
  ``dynamic_agreement``: the fraction of them whose predicted class is the same.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from prunelab.dynamic.executor import DynamicExecutor
from prunelab.dynamic.gates import FBSGates


def _quantile(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values.to(torch.float64), q))


@torch.no_grad()
def executed_counts(
    model: nn.Module,
    gates: FBSGates,
    batches: Iterable[Any],
    samples: int | None = None,
) -> torch.Tensor:
    """Executed channels per input and gate (``(N, n_gates)`` int64) of the gated ``model``
    in evaluation mode over the inputs of ``batches`` (``(x, y)`` pairs or tensors), at most
    ``samples`` of them."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    seen = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if samples is not None:
                x = x[: samples - seen]
            if len(x) == 0:
                break
            with gates.recording() as record:
                model(x.to(device))
            rows.append(torch.stack([torch.cat(r) for r in record], dim=1).to(torch.int64))
            seen += len(x)
            if samples is not None and seen >= samples:
                break
    finally:
        model.train(was_training)
    if not rows:
        raise ValueError("no inputs to measure the dynamic MACs on")
    return torch.cat(rows)


def mac_report(executor: DynamicExecutor, counts: torch.Tensor) -> dict[str, Any]:
    """The MAC figures of the module docstring from executed ``counts`` (``(N, n_gates)``)."""
    plan = executor.plan
    macs = plan.macs(counts)
    dense = plan.dense_macs()
    mean = float(macs.to(torch.float64).mean())
    channels = torch.tensor([g.out_channels for g in plan.gates], dtype=torch.float64)
    density = counts.to(torch.float64) / channels
    return {
        "macs_dynamic_mean": mean,
        "macs_dynamic_p50": _quantile(macs, 0.5),
        "macs_dynamic_p90": _quantile(macs, 0.9),
        "macs_dynamic_p99": _quantile(macs, 0.99),
        "macs_dynamic_min": int(macs.min()),
        "macs_dynamic_max": int(macs.max()),
        "macs_dynamic_dense": dense,
        "macs_dynamic_predictors": plan.predictor_macs(),
        "macs_dynamic_x_dense": dense / mean if mean else None,
        "dynamic_density_mean": float((counts.to(torch.float64).sum(1) / channels.sum()).mean()),
        "dynamic_density_layers": {
            g.conv: round(float(d), 6) for g, d in zip(plan.gates, density.mean(0), strict=True)
        },
        "dynamic_samples": int(counts.shape[0]),
    }


@torch.no_grad()
def latency_report(
    model: nn.Module,
    gates: FBSGates,
    executor: DynamicExecutor,
    inputs: Sequence[torch.Tensor],
    rounds: int = 5,
    repeats: int = 3,
) -> dict[str, Any]:
    """Batch-1 latency (ms per input) of the plain, gated-masked and dynamic variants over
    ``inputs`` (each ``(1, ...)``), alternating rounds (see the module docstring), plus the
    executor's agreement with the gated model."""
    from prunelab.cost.latency import time_call

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    xs = [x.to(device) for x in inputs]
    diffs, same = [], 0
    try:
        with torch.inference_mode():
            for x in xs:
                ref, got = model(x), executor(x)
                diffs.append(float((ref - got).abs().max()))
                same += int(ref.argmax(1).item() == got.argmax(1).item())

            def run(net) -> None:
                for x in xs:
                    net(x)

            times: dict[str, list[float]] = {"dense_plain": [], "gated_masked": [], "dynamic": []}
            for _ in range(max(1, int(rounds))):
                with gates.removed():
                    stats = time_call(lambda: run(model), device, repeats=repeats, min_block_s=0.0)
                times["dense_plain"].append(stats["latency_ms"] / len(xs))
                stats = time_call(lambda: run(model), device, repeats=repeats, min_block_s=0.0)
                times["gated_masked"].append(stats["latency_ms"] / len(xs))
                stats = time_call(lambda: run(executor), device, repeats=repeats, min_block_s=0.0)
                times["dynamic"].append(stats["latency_ms"] / len(xs))
    finally:
        model.train(was_training)
    out: dict[str, Any] = {
        f"latency_ms/{name}/b1": statistics.median(values) for name, values in times.items()
    }
    dense, dynamic = out["latency_ms/dense_plain/b1"], out["latency_ms/dynamic/b1"]
    out["dynamic_speedup_b1"] = dense / dynamic if dynamic else None
    out["dynamic_max_abs_diff"] = max(diffs) if diffs else None
    out["dynamic_agreement"] = same / len(xs) if xs else None
    out["dynamic_latency_samples"] = len(xs)
    out["dynamic_latency_threads"] = torch.get_num_threads()
    return out


def dynamic_cost_report(
    model: nn.Module,
    gates: FBSGates,
    input_shape: Sequence[int],
    batches: Iterable[Any],
    samples: int | None = None,
    measure_latency: bool = True,
    latency_samples: int = 32,
    latency_rounds: int = 5,
) -> dict[str, Any]:
    """MACs per input over ``batches`` (at most ``samples`` inputs) and, with
    ``measure_latency``, batch-1 latency over the first ``latency_samples`` of them; the
    keys of the module docstring."""
    executor = DynamicExecutor(model, gates, input_shape)
    inputs: list[torch.Tensor] = []

    def collect(source: Iterable[Any]) -> Iterable[Any]:
        for batch in source:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for row in x[: max(0, latency_samples - len(inputs))]:
                inputs.append(row.unsqueeze(0))
            yield batch

    counts = executed_counts(model, gates, collect(batches), samples)
    report = mac_report(executor, counts)
    if measure_latency and inputs:
        report.update(latency_report(model, gates, executor, inputs, rounds=latency_rounds))
    return report


__all__ = ["dynamic_cost_report", "executed_counts", "latency_report", "mac_report"]
