"""The W&B sweep files must run the same grid the Hydra experiment describes."""

from pathlib import Path

import yaml

from prunelab.config import check_overrides

ROOT = Path(__file__).resolve().parents[2]


def _overrides(sweep: dict) -> list[str]:
    out = []
    for key, spec in sweep["parameters"].items():
        value = spec["value"] if "value" in spec else spec["values"][0]
        out.append(f"{key}={value}")
    return out


def test_wandb_sweeps_use_valid_hydra_overrides():
    sweeps = sorted((ROOT / "scripts" / "sweeps").glob("*.yaml"))
    assert sweeps
    for path in sweeps:
        sweep = yaml.safe_load(path.read_text())
        assert sweep["program"] == "train.py"
        assert "${args_no_hyphens}" in sweep["command"]
        check_overrides(_overrides(sweep))  # raises on an unknown option or key


def test_wandb_sweep_matches_the_experiment_grid():
    sweep = yaml.safe_load((ROOT / "scripts/sweeps/fmnist_static_vs_dynamic.yaml").read_text())
    exp = yaml.safe_load((ROOT / "conf/experiment/fmnist_static_vs_dynamic.yaml").read_text())
    grid = exp["hydra"]["sweeper"]["params"]
    for key in ("pruning", "sparsity", "seed"):
        expected = [str(v) for v in str(grid[key]).split(",")]
        assert [str(v) for v in sweep["parameters"][key]["values"]] == expected, key
    assert sweep["parameters"]["epochs"]["value"] == exp["epochs"]
