"""N:M and threshold masks through the real Hydra config and Lightning."""

from __future__ import annotations

import pytest
import torch

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.sparsity.patterns import is_n_m
from prunelab.train import train

LAYERS = {"layers.0.weight", "layers.1.weight", "head.weight"}


def final_masks(record) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(
        files.last_checkpoint(record["run_dir"]), map_location="cpu", weights_only=False
    )
    return checkpoint["sparsity_engine"]["masks"]


def test_static_2_4_ends_with_a_2_4_mask_in_every_layer(compose_cfg):
    record = train(
        compose_cfg("pruning=static", "sparsity=0.5", "distribution.n_m=2:4", "epochs=2")
    )
    assert record["status"] == "completed"
    sparsity = record["sparsity"]
    assert set(sparsity["layers"]) == LAYERS
    assert all(value == pytest.approx(0.5) for value in sparsity["layers"].values())
    assert sparsity["n_updates"] == 1
    masks = final_masks(record)
    assert set(masks) == LAYERS
    for name, mask in masks.items():
        assert is_n_m(mask, 2, 4), name
    assert record["best_checkpoint"]["sparsity"] == pytest.approx(0.5)


def test_gmp_2_4_ends_with_a_2_4_mask(compose_cfg):
    record = train(
        compose_cfg(
            "pruning=gmp",
            "sparsity=0.5",
            "distribution.n_m=2:4",
            "schedule.frequency=1",
            "epochs=2",
        )
    )
    assert record["status"] == "completed"
    assert record["sparsity"]["global"] == pytest.approx(0.5)
    for name, mask in final_masks(record).items():
        assert is_n_m(mask, 2, 4), name


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (("pruning=static", "sparsity=0.5", "distribution.n_m=5:4"), "distribution.n_m='5:4'"),
        (("pruning=static", "sparsity=0.5", "distribution.n_m=0:4"), "distribution.n_m='0:4'"),
        (("pruning=static", "sparsity=0.5", "distribution.n_m=2:x"), "distribution.n_m='2:x'"),
        (("pruning=static", "sparsity=0.9", "distribution.n_m=2:4"), "sparsity=0.5"),
        (("pruning=rigl", "sparsity=0.5", "distribution.n_m=2:4"), "pruning=rigl"),
        (("pruning=gmp", "pruning.threshold=0.1"), "pruning.threshold"),
        (
            ("pruning=static", "pruning.threshold=0.1", "pruning.threshold_mode=max"),
            "threshold_mode",
        ),
    ],
)
def test_bad_combinations_fail_before_training(compose_cfg, overrides, needle):
    from prunelab.config import validate

    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "\n" not in message and needle in message


@pytest.mark.parametrize(("mode", "threshold"), [("absolute", 0.05), ("std", 0.5)])
def test_static_threshold_reports_the_sparsity_reached(compose_cfg, mode, threshold):
    record = train(
        compose_cfg(
            "pruning=static",
            f"pruning.threshold={threshold}",
            f"pruning.threshold_mode={mode}",
            "epochs=2",
        )
    )
    assert record["status"] == "completed"
    sparsity = record["sparsity"]
    assert 0.0 < sparsity["global"] < 0.9  # whatever θ gives, not the ignored sparsity=0.9
    assert sparsity["weights_zero_global"] >= sparsity["global"] - 1e-9
    assert sparsity["n_updates"] == 1
    # only the epochs after the pruning step count for the best checkpoint
    assert record["best_checkpoint"]["sparsity"] == pytest.approx(sparsity["global"])
    # the record says a threshold, not the ignored sparsity=0.9, decided the sparsity
    assert sparsity["target"] is None
    assert sparsity["threshold"] == {"value": threshold, "mode": mode}


def test_static_1x4_blocks_end_block_sparse_at_target(compose_cfg):
    """Block-sparse masks through the real config: the default MLP's [100, 40], [100, 100]
    and [10, 100] matrices split into 1x4 blocks; 2x4 given as a list works too."""
    from prunelab.sparsity.patterns import is_block_sparse

    record = train(
        compose_cfg(
            "pruning=static",
            "sparsity=0.9",
            "distribution.block=1x4",
            "cost.enabled=false",
        )
    )
    assert record["status"] == "completed"
    masks = final_masks(record)
    assert set(masks) == LAYERS
    for name, mask in masks.items():
        assert is_block_sparse(mask, (1, 4)), name
    slack = len(masks) * 4 / sum(mask.numel() for mask in masks.values())  # a block a layer
    sparsity = record["sparsity"]
    assert abs(sparsity["global"] - 0.9) <= slack
    assert record["best_checkpoint"]["sparsity"] == pytest.approx(sparsity["global"])
    assert sparsity["method"]["pattern"] == "block" and sparsity["method"]["block"] == "1x4"
    assert record["config"]["distribution"]["block"] == "1x4"

    from prunelab.config import validate

    validate(compose_cfg("pruning=static", "sparsity=0.9", "distribution.block=[2,4]"))
    for overrides, needle in (
        (("distribution.block=4",), "distribution.block=4"),
        (("distribution.block=1x4", "distribution.n_m=2:4", "sparsity=0.5"), "n_m"),
        (("distribution.block=1x4", "pruning.threshold=0.1"), "pruning.threshold"),
    ):
        with pytest.raises(ConfigError) as err:
            validate(compose_cfg("pruning=static", *overrides))
        assert "\n" not in str(err.value) and needle in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("pruning=rigl", "distribution.block=1x4"))
    assert "pruning=rigl" in str(err.value)
