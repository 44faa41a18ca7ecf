"""Iterative magnitude pruning through the real config and Lightning: levels as sub-runs,
rewinding, branches, resume and bad input."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.evaluate import load_run, resolve_checkpoint
from prunelab.report.records import find_records
from prunelab.sparsity.masks import Masks
from prunelab.train import train

IMP = (
    "pruning=imp",
    "sparsity=0.5",
    "pruning.level_sparsities=[0.3,0.5]",
    "epochs=1",
    "cost.latency=false",
)


def _masks(level_dir) -> Masks:
    ckpt = torch.load(files.last_checkpoint(level_dir), map_location="cpu", weights_only=False)
    return Masks.from_state_dict(ckpt["sparsity_engine"]["masks"])


def _weights(level_dir) -> dict[str, torch.Tensor]:
    ckpt = torch.load(files.last_checkpoint(level_dir), map_location="cpu", weights_only=False)
    return {k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def test_imp_trains_every_level_as_a_sub_run(compose_cfg, tmp_path):
    run_dir = tmp_path / "imp"
    record = train(compose_cfg(*IMP, "pruning.branch=[random,reinit]", run_dir=run_dir))
    assert record["status"] == "completed"
    lines = record["sub_runs"]
    assert [(line["level"], line["branch"]) for line in lines] == [
        (0, "lottery"),
        (1, "lottery"), (1, "random"), (1, "reinit"),
        (2, "lottery"), (2, "random"), (2, "reinit"),
    ]  # fmt: skip
    assert all(line["status"] == "completed" for line in lines)
    # Each level: its own record, checkpoint and sparsity at its level.
    level2 = json.loads(files.results_path(files.imp_level_dir(run_dir, 2)).read_text())
    assert level2["sparsity"]["global"] == pytest.approx(0.5, abs=1e-3)
    assert level2["sparsity"]["target"] == pytest.approx(0.5, abs=1e-3)
    assert level2["config"]["sparsity"] == 0.5 and level2["imp"]["level"] == 2
    assert level2["choices"]["pruning"] == "imp"
    # eval.py reloads a level and a branch (their records name the level and branch); the
    # IMP run itself points to its levels.
    for sub in (files.imp_level_dir(run_dir, 2), files.imp_level_dir(run_dir, 1, "random")):
        folder, ckpt, _ = resolve_checkpoint(run_dir=sub)
        assert load_run(folder, ckpt_path=ckpt)["masks"].sparsity() > 0
    with pytest.raises(ConfigError, match="its models are its levels"):
        resolve_checkpoint(run_dir=run_dir)
    # Nested masks; overlap with the previous level recorded.
    m0, m1, m2 = (_masks(files.imp_level_dir(run_dir, i)) for i in range(3))
    assert m0.sparsity() == 0.0
    for small, big in ((m1, m0), (m2, m1)):
        assert all(not bool((small[n] & ~big[n]).any()) for n in small)
    overlap = level2["imp"]["overlap_previous"]["global"]
    assert overlap == pytest.approx(sum(m2.nnz().values()) / sum(m1.nnz().values()))
    # Level 2's mask keeps the largest magnitudes of level 1's trained weights.
    trained = _weights(files.imp_level_dir(run_dir, 1))
    for name, mask in m2.items():
        kept = trained[name][mask].abs()
        dropped = trained[name][m1[name] & ~mask].abs()
        assert float(kept.min()) >= float(dropped.max())
    # Branches: the same per-layer counts; reinit keeps the lottery mask.
    assert _masks(files.imp_level_dir(run_dir, 2, "random")).nnz() == m2.nnz()
    assert _masks(files.imp_level_dir(run_dir, 2, "reinit")).equal(m2)
    # Tables read the levels, not the IMP summary.
    found = {(r.get("pruning"), r.get("sparsity")) for r in find_records([run_dir])}
    assert ("imp", 0.5) in found and ("imp_random", 0.3) in found and ("imp", 0.0) in found
    assert len(find_records([run_dir])) == len(lines)


class _FirstWeights:
    """Records the model weights when each fit starts (after the masks are applied)."""

    def __init__(self) -> None:
        import pytorch_lightning as pl

        outer = self

        class Callback(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                state = pl_module.model.state_dict()
                outer.starts.append({k: v.detach().clone() for k, v in state.items()})

        self.starts: list[dict[str, torch.Tensor]] = []
        self.callback = Callback()


def test_levels_start_from_the_rewound_weights(compose_cfg, tmp_path):
    run_dir = tmp_path / "imp"
    spy = _FirstWeights()
    train(compose_cfg(*IMP, "pruning.rewind_step=3", run_dir=run_dir), callbacks=[spy.callback])
    saved = torch.load(files.imp_rewind_weights(run_dir), weights_only=True)
    for level, start in enumerate(spy.starts[1:], start=1):
        masks = _masks(files.imp_level_dir(run_dir, level))
        for key, value in saved.items():
            if key in masks:
                assert torch.equal(start[key], value * masks[key])
            else:
                assert torch.equal(start[key], value)
    # The rewind point is step 3 of level 0, not the initialisation.
    assert not torch.equal(saved["layers.0.weight"], spy.starts[0]["layers.0.weight"])
    # With k > 0 the later levels train steps k..T.
    level0 = json.loads(files.results_path(files.imp_level_dir(run_dir, 0)).read_text())
    level1 = json.loads(files.results_path(files.imp_level_dir(run_dir, 1)).read_text())
    assert level1["global_step"] == level0["global_step"] - 3


def test_a_killed_imp_run_continues_from_its_last_finished_level_and_only_its_own(
    compose_cfg, tmp_path
):
    run_dir = tmp_path / "imp"
    first = train(compose_cfg(*IMP, run_dir=run_dir))
    # Kill during level 2: its folder holds no completed record.
    shutil.rmtree(files.imp_level_dir(run_dir, 2))
    level1 = files.results_path(files.imp_level_dir(run_dir, 1))
    stamp = level1.stat().st_mtime_ns
    again = train(compose_cfg(*IMP, run_dir=run_dir))
    assert level1.stat().st_mtime_ns == stamp  # level 1 was not trained again
    assert again["sub_runs"][-1]["metrics"] == first["sub_runs"][-1]["metrics"]
    assert _masks(files.imp_level_dir(run_dir, 2)).sparsity() == pytest.approx(0.5, abs=1e-3)
    # The folder holds this configuration's levels: another one is refused.
    with pytest.raises(ConfigError, match="holds IMP levels of another configuration"):
        train(compose_cfg(*IMP, "pruning.rate=0.3", run_dir=run_dir))


def test_rewind_step_beyond_training_is_an_error_before_training(compose_cfg, tmp_path):
    run_dir = tmp_path / "imp"
    with pytest.raises(ConfigError, match=r"pruning.rewind_step=100000 is beyond training"):
        train(compose_cfg(*IMP, "pruning.rewind_step=100000", run_dir=run_dir))
    assert not files.imp_levels_dir(run_dir).exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruning.branch=nonexistent", "pruning.branch must be none or one of"),
        ("distribution=erk", "prunes layerwise (distribution=uniform)"),
        ("pruning.level_sparsities=[0.3,0.6]", "set sparsity=0.6"),
        ("pruning.branch_levels=[0.4]", "0.4 is not the sparsity of a level"),
        ("ckpt_path=x.ckpt", "not from ckpt_path"),
    ],
)
def test_bad_imp_options_fail_before_training(compose_cfg, tmp_path, override, message):
    run_dir = tmp_path / "imp"
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(compose_cfg(*IMP, override, run_dir=run_dir))
    assert not files.imp_levels_dir(run_dir).exists()
