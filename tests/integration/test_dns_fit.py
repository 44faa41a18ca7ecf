"""Dynamic Network Surgery through the real config and Lightning."""

from __future__ import annotations

import pytest
import torch

from prunelab.train import train


def test_dns_runs_end_to_end_and_ends_on_target(compose_cfg, tmp_path):
    record = train(compose_cfg("pruning=dns", "sparsity=0.9", "epochs=2"))
    assert record["status"] == "completed"
    sp = record["sparsity"]
    assert sp["global"] == pytest.approx(0.9, abs=1e-3)
    assert sp["weights_zero_global"] >= sp["global"] - 1e-9
    # Surgery at every step up to the schedule's end (75% of 8 steps): steps 0..6.
    assert sp["n_updates"] == 7
    curve = [point["sparsity/global"] for point in record["sparsity_curve"]]
    assert curve[0] == 0.0 and curve[-1] == pytest.approx(0.9, abs=1e-3)
    assert record["config"]["distribution"]["name"] == "uniform"
    assert all(value == pytest.approx(0.9, abs=1e-2) for value in sp["layers"].values())

    # The checkpoint carries the full-precision weights: pruned ones are not zero there.
    last = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    engine = last["sparsity_engine"]
    masks, shadow = engine["masks"], engine["shadow"]
    assert set(shadow) == set(masks)
    assert any(bool((shadow[n][~masks[n]] != 0).any()) for n in masks)
    weights = {k.removeprefix("model."): v for k, v in last["state_dict"].items()}
    for name, mask in masks.items():
        assert bool((weights[name][~mask] == 0).all())
        assert torch.equal(weights[name][mask], shadow[name][mask])
