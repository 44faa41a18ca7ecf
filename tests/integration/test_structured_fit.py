"""Structured pruning through the real config and Lightning: at target, per-layer channel
fractions in the record, and a compacted model cheaper than the dense one."""

from __future__ import annotations

import pytest

from prunelab.train import train


def _check(record: dict, target: float) -> dict:
    assert record["status"] == "completed"
    sparsity = record["sparsity"]
    method = sparsity["method"]
    assert method["at_target"] is True
    assert method["realised"] == pytest.approx(sparsity["global"])
    assert abs(method["realised"] - target) < 0.05, "channels allow a closer sparsity"
    fractions = method["channels_removed"]
    assert set(fractions) == set(sparsity["layers"])
    assert any(v > 0 for v in fractions.values())
    cost = record["cost"]
    assert cost["macs_infer_compact"] < cost["macs_infer_dense"]
    assert cost["params_compact"] < cost["params_total"]
    return fractions


@pytest.mark.parametrize("distribution", ["uniform", "global"])
def test_structured_l1_on_the_default_mlp(compose_cfg, distribution):
    record = train(
        compose_cfg(
            "pruning=structured_l1",
            "sparsity=0.5",
            f"distribution={distribution}",
            "cost.latency=false",
        )
    )
    fractions = _check(record, 0.5)
    assert list(fractions.values())[-1] == 0.0, "the classifier keeps its outputs"


def test_structured_l1_on_a_cnn_reports_the_compacted_latency(compose_cfg):
    record = train(
        compose_cfg(
            "pruning=structured_l1",
            "model=mnist1d_cnn",
            "sparsity=0.5",
            "cost.latency=true",
            "cost.latency_batch_sizes=[1]",
            "cost.latency_repeats=2",
        )
    )
    _check(record, 0.5)
    assert record["cost"]["latency_ms/compact/b1"] > 0


@pytest.mark.parametrize("method", ["neuron_sensitivity", "taylor"])
def test_other_structured_methods_on_the_cnn(compose_cfg, method):
    record = train(
        compose_cfg(f"pruning={method}", "model=mnist1d_cnn", "sparsity=0.5", "cost.latency=false")
    )
    _check(record, 0.5)


def test_gradual_structured_pruning_reaches_the_target(compose_cfg):
    record = train(
        compose_cfg(
            "pruning=structured_l1",
            "schedule=cubic",
            "schedule.frequency=1",
            "sparsity=0.5",
            "cost.latency=false",
        )
    )
    _check(record, 0.5)
    assert record["sparsity"]["n_updates"] > 1


def test_block_refuses_a_model_without_residual_blocks(compose_cfg):
    from prunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="residual") as err:
        train(compose_cfg("pruning=block", "sparsity=0.3", "cost.latency=false"))
    assert "\n" not in str(err.value)


def test_block_on_resnet20_removes_whole_blocks(compose_cfg):
    record = train(
        compose_cfg(
            "pruning=block",
            "model=resnet20",
            "dataset=digits",
            "sparsity=0.3",
            "cost.latency=false",
        )
    )
    method = record["sparsity"]["method"]
    assert record["status"] == "completed" and method["at_target"] is True
    assert method["blocks_removed"]
    for block in method["blocks_removed"]:
        assert method["channels_removed"][f"{block}.conv1.weight"] == 1.0
    assert record["cost"]["params_compact"] < record["cost"]["params_total"]
