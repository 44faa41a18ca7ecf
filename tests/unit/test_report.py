"""Tables and plots from synthetic results records (no training, no network)."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest

from prunelab import files
from prunelab.report.published import Published, PublishedEntry, available, load_published
from prunelab.report.records import (
    Record,
    filter_records,
    find_records,
    load_wandb_runs,
    parse_overrides,
)
from prunelab.report.table import (
    FAILED,
    MISSING,
    OK,
    PARTIAL,
    RUNNING,
    aggregate,
    match_published,
    to_csv,
    to_latex,
    to_markdown,
)


def make(
    pruning: str = "rigl",
    sparsity: float = 0.9,
    seed: int = 0,
    acc: float | None = 0.9,
    status: str = "completed",
    distribution: str = "erk",
    lr: float = 0.01,
    dataset: str = "mnist1d",
    model: str = "mlp",
    **fields,
) -> dict:
    """A results record shaped like the ones train.py writes."""
    config = {
        "seed": seed,
        "sparsity": sparsity,
        "pruning": {"name": pruning},
        "distribution": {"name": distribution},
        "optimizer": {"_target_": "torch.optim.Adam", "lr": lr},
        "dataset": {"_target_": "prunelab.data.MNIST1DDataModule", "seed": seed},
        "model": {"_target_": "prunelab.models.MLP"},
        "paths": {"output_dir": f"/runs/{pruning}/{sparsity}/{seed}"},
    }
    data = {
        "status": status,
        "config_hash": "abcdef012345",
        "seed": seed,
        "config": config,
        "choices": {
            "pruning": pruning,
            "dataset": dataset,
            "model": model,
            "distribution": distribution,
            "optimizer": "adam",
        },
        "metrics": {} if acc is None else {"test/acc": acc, "val/acc_best": acc + 0.01},
        "sparsity": {
            "target": 0.0 if pruning == "dense" else sparsity,
            "global": 0.0 if pruning == "dense" else sparsity,
            "layers": {"layers.0.weight": sparsity},
        },
        "wall_time_s": 1.5,
    }
    if status == "failed":
        data["error"] = "RuntimeError: boom"
    data.update(fields)
    return data


def rec(*args, **kwargs) -> Record:
    data = make(*args, **kwargs)
    return Record(data=data, source=f"mem/{data['choices']['pruning']}/{data['seed']}")


def write_run(folder: Path, data: dict | None, overrides: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if data is not None:
        files.results_path(folder).write_text(json.dumps(data))
    if overrides is not None:
        (folder / files.HYDRA_DIR).mkdir(exist_ok=True)
        (folder / files.HYDRA_DIR / "overrides.yaml").write_text(
            "".join(f"- {o}\n" for o in overrides)
        )
    return folder


# -- records -----------------------------------------------------------------------------
def test_get_resolves_aliases_metrics_and_dotted_paths():
    r = rec("rigl", 0.9, seed=3, acc=0.8, cost={"flops_train": 1.5e9})
    assert r.get("pruning") == "rigl" and r.get("sparsity") == 0.9 and r.get("seed") == 3
    assert r.get("dataset") == "mnist1d" and r.get("model") == "mlp"
    assert r.get("distribution") == "erk" and r.get("optimizer") == "adam"
    assert r.get("test/acc") == 0.8 == r.get("metrics/test/acc") == r.get("metrics.test/acc")
    assert r.get("cost.flops_train") == 1.5e9 == r.get("cost/flops_train")
    assert r.get("config.optimizer.lr") == 0.01 == r.get("optimizer.lr") == r.get("lr", 0.01)
    assert r.get("sparsity.layers.layers.0.weight") == 0.9  # keys with dots
    assert r.get("cost.flops_infer_sparse") is None and r.get("nope", "x") == "x"
    assert r.number("test/acc") == 0.8 and r.number("pruning") is None


def test_get_falls_back_to_config_without_choices_and_dense_sparsity_is_zero():
    data = make("rigl", 0.95)
    del data["choices"]
    r = Record(data=data, source="x")
    assert r.get("pruning") == "rigl" and r.get("distribution") == "erk"
    assert r.get("dataset") == "MNIST1DDataModule" and r.get("model") == "MLP"
    dense = rec("dense", 0.9)
    assert dense.is_dense and dense.get("sparsity") == 0.0 and not r.is_dense


def test_parse_overrides():
    assert parse_overrides(["pruning=rigl", "sparsity=0.9", "seed=1", "+tag=x", "bad"]) == {
        "pruning": "rigl",
        "sparsity": 0.9,
        "seed": 1,
        "tag": "x",
    }


def test_find_records_in_multirun_run_dirs_globs_and_failed_job_folders(tmp_path, caplog):
    sweep = tmp_path / "multiruns" / "train" / "2025-01-01_00-00-00"
    for i, (p, seed) in enumerate([("dense", 0), ("rigl", 0), ("rigl", 1)]):
        write_run(sweep / str(i), make(p, seed=seed), [f"pruning={p}", f"seed={seed}"])
    write_run(sweep / "10", make("rigl", seed=2), ["pruning=rigl", "seed=2"])
    # A bad config: Hydra wrote the job folder, train.py no record.
    write_run(sweep / "3", None, ["pruning=rigl", "sparsity=0.95", "seed=1"])
    (sweep / "0" / files.WANDB_DIR / "run-x").mkdir(parents=True)
    (sweep / "0" / files.WANDB_DIR / "run-x" / files.RESULTS).write_text("{}")  # not a run

    found = find_records([sweep])
    assert [Path(r.source).name for r in found] == ["0", "1", "2", "3", "10"]
    failed = found[3]
    assert failed.status == "failed" and "no results.json" in failed.error
    assert failed.get("pruning") == "rigl" and failed.get("sparsity") == 0.95
    assert failed.get("seed") == 1

    single = write_run(tmp_path / "runs" / "train" / "t1", make("set", 0.8))
    assert [r.get("pruning") for r in find_records([single])] == ["set"]
    assert len(find_records([str(files.results_path(single))])) == 1
    assert len(find_records([str(tmp_path / "multiruns" / "*" / "*" / "1")])) == 1
    assert len(find_records([str(tmp_path / "**" / files.RESULTS)])) == 5
    with caplog.at_level("WARNING"):
        assert find_records([tmp_path / "nowhere"]) == []
    assert "no such path" in caplog.text


def test_failed_job_folder_uses_hydra_choices_and_config(tmp_path):
    job = write_run(tmp_path / "0", None, ["sparsity=0.8"])
    (job / ".hydra" / "config.yaml").write_text("seed: 4\nsparsity: 0.8\npruning:\n  name: set\n")
    (job / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    choices:\n      pruning: set\n      dataset: digits\n"
    )
    (r,) = find_records([tmp_path])
    assert (r.status, r.get("pruning"), r.get("dataset"), r.get("seed")) == (
        "failed",
        "set",
        "digits",
        4,
    )


# -- aggregation -------------------------------------------------------------------------
def test_mean_sample_std_and_n_over_seeds():
    records = [rec("rigl", 0.9, seed=s, acc=a) for s, a in enumerate([0.90, 0.92, 0.97])]
    records.append(rec("rigl", 0.8, seed=0, acc=0.95))
    table = aggregate(records, ["pruning"], ["sparsity"], "test/acc")
    cell = table.cell("rigl", 0.9)
    assert cell.status == OK and cell.n == 3 == cell.n_jobs
    assert cell.mean == pytest.approx(statistics.fmean([0.90, 0.92, 0.97]))
    assert cell.std == pytest.approx(statistics.stdev([0.90, 0.92, 0.97]))  # ddof=1
    single = table.cell("rigl", 0.8)
    assert (single.n, single.mean, single.std) == (1, 0.95, 0.0)
    assert table.row_keys == [("rigl",)] and table.col_keys == [(0.8,), (0.9,)]


def test_dense_is_repeated_in_every_sparsity_column():
    records = [rec("dense", 0.9, seed=s, acc=a) for s, a in [(0, 0.96), (1, 0.98)]]
    records += [rec("rigl", sp, seed=0, acc=0.9) for sp in (0.8, 0.9, 0.95)]
    table = aggregate(records, ["pruning"], ["sparsity"], "test/acc")
    assert table.row_keys[0] == ("dense",)
    dense = [table.cell("dense", sp) for sp in (0.8, 0.9, 0.95)]
    assert all(c.mean == pytest.approx(0.97) and c.n == 2 and c.shared for c in dense)
    assert table.cell("dense", 0.0).status == MISSING  # no column of its own
    md = to_markdown(table)
    assert md.count("97.00 ± 1.41 (n=2)") == 3 and "repeated in every sparsity column" in md


def test_dense_run_at_several_sparsities_counts_once_per_seed():
    records = [rec("dense", sp, seed=s, acc=0.9 + s / 100) for sp in (0.8, 0.9) for s in (0, 1)]
    records += [rec("rigl", 0.8), rec("rigl", 0.9)]
    cell = aggregate(records, ["pruning"], ["sparsity"], "test/acc").cell("dense", 0.8)
    assert (cell.n, cell.n_jobs) == (2, 2) and cell.mean == pytest.approx(0.905)


def test_failed_partial_running_and_missing_cells():
    records = [
        rec("rigl", 0.9, seed=0, acc=0.9),
        rec("rigl", 0.9, seed=1, acc=0.8),
        rec("rigl", 0.9, seed=2, status="failed", acc=None),
        rec("rigl", 0.95, seed=0, status="failed", acc=None),
        rec("rigl", 0.95, seed=1, status="failed", acc=None),
        rec("set", 0.95, seed=0, status="running", acc=None),
        rec("set", 0.9, seed=0, acc=0.85),
        # A re-run of a failed seed that completed: the seed counts as completed.
        rec("set", 0.9, seed=1, status="failed", acc=None),
        rec("set", 0.9, seed=1, acc=0.87),
        rec("static", 0.9, seed=0, acc=0.7),
    ]
    table = aggregate(records, ["pruning"], ["sparsity"], "test/acc")
    partial = table.cell("rigl", 0.9)
    assert (partial.status, partial.n, partial.n_jobs) == (PARTIAL, 2, 3)
    assert partial.mean == pytest.approx(0.85)
    assert table.cell("rigl", 0.95).status == FAILED
    assert table.cell("rigl", 0.95).errors == ["RuntimeError: boom"]
    assert table.cell("set", 0.95).status == RUNNING
    assert (table.cell("set", 0.9).status, table.cell("set", 0.9).n) == (OK, 2)
    assert table.cell("static", 0.95).status == MISSING
    md = to_markdown(table)
    assert "85.00 ± 7.07 (n=2/3)" in md
    rigl_line = next(line for line in md.splitlines() if line.startswith("| rigl"))
    assert rigl_line.endswith("| failed |")
    static_line = next(line for line in md.splitlines() if line.startswith("| static"))
    assert static_line.endswith("| 70.00 (n=1) | — |")
    assert "| running |" in md and "rigl/95% failed: seed 0: failed (RuntimeError: boom)" in md


def test_rows_order_methods_by_taxonomy_and_support_several_keys():
    records = [rec(p, 0.9, acc=0.9) for p in ("set", "rigl", "dense", "static", "zzz")]
    records += [rec("rigl", 0.9, distribution="uniform", acc=0.5)]
    table = aggregate(records, ["pruning", "distribution"], ["sparsity"], "test/acc")
    assert [r[0] for r in table.row_keys] == ["dense", "static", "set", "rigl", "rigl", "zzz"]
    assert table.cell(("rigl", "uniform"), 0.9).mean == 0.5
    md = to_markdown(table)
    assert "| pruning | distribution | 90% |" in md


def test_cell_mixing_configurations_gets_a_note():
    records = [rec("rigl", 0.9, seed=0, lr=0.01), rec("rigl", 0.9, seed=1, lr=0.1)]
    table = aggregate(records, ["pruning"], ["sparsity"], "test/acc")
    assert any("optimizer.lr" in n and "rigl/90%" in n for n in table.notes)
    same = aggregate(
        [rec("rigl", 0.9, seed=s) for s in (0, 1)], ["pruning"], ["sparsity"], "test/acc"
    )
    assert same.notes == []


# -- formats -----------------------------------------------------------------------------
@pytest.fixture
def grid():
    records = [rec("dense", 0.9, seed=s, acc=0.98 + s / 1000) for s in (0, 1)]
    records += [rec("rigl", sp, seed=s, acc=sp + s / 100) for sp in (0.8, 0.9) for s in (0, 1)]
    records += [rec("rigl", 0.95, seed=0, status="failed", acc=None)]
    return records


def test_latex_uses_booktabs_pm_and_escapes(grid):
    tex = to_latex(aggregate(grid, ["pruning"], ["sparsity"], "test/acc"))
    for token in ("\\begin{tabular}{lrrr}", "\\toprule", "\\midrule", "\\bottomrule"):
        assert token in tex
    assert "pruning & 80\\% & 90\\% & 95\\% \\\\" in tex
    assert "rigl & 80.50 $\\pm$ 0.71 & 90.50 $\\pm$ 0.71 & failed \\\\" in tex
    assert "n=2 unless shown" in tex
    body = tex[tex.index("\\begin{tabular}") :]
    assert "%" not in body.replace("\\%", "")  # no stray comment in the tabular


def test_csv_has_one_line_per_cell_with_raw_values(grid):
    table = aggregate(grid, ["pruning"], ["sparsity"], "test/acc")
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert len(rows) == 2 * 3
    by = {(r["pruning"], r["sparsity"]): r for r in rows}
    assert float(by[("rigl", "0.8")]["mean"]) == pytest.approx(0.805)
    assert float(by[("rigl", "0.8")]["std"]) == pytest.approx(statistics.stdev([0.8, 0.81]))
    assert by[("rigl", "0.8")]["n"] == "2" and by[("rigl", "0.8")]["status"] == "ok"
    assert by[("rigl", "0.95")]["status"] == "failed" and by[("rigl", "0.95")]["mean"] == ""
    assert by[("dense", "0.95")]["mean"] == by[("dense", "0.8")]["mean"]
    scaled = list(csv.DictReader(io.StringIO(to_csv(table, scale=100))))
    assert float(scaled[0]["mean"]) == pytest.approx(98.05)


def test_extra_columns_relative_to_dense_scientific_or_absent():
    records = [rec("dense", 0.9, seed=s, cost={"flops_train": 4e12}) for s in (0, 1)]
    records += [rec("rigl", 0.9, seed=s, cost={"flops_train": 1e12}) for s in (0, 1)]
    table = aggregate(records, ["pruning"], ["sparsity"], "test/acc", ["cost.flops_train"])
    assert table.cell("rigl", 0.9).extras["cost.flops_train"] == 1e12
    md = to_markdown(table)
    assert "90% flops_train" in md and "| 0.25× |" in md and "| 1.00× |" in md
    assert "1.00e+12" in to_markdown(table, extra_format="sci")
    assert "$1.00 \\times 10^{12}$" in to_latex(table, extra_format="sci")
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert float(rows[1]["cost.flops_train/dense"]) == pytest.approx(0.25)

    sparse_only = aggregate(
        records[2:], ["pruning"], ["sparsity"], "test/acc", ["cost.flops_train"]
    )
    assert "1.00e+12" in to_markdown(sparse_only)  # no dense run: scientific notation

    absent = aggregate(records, ["pruning"], ["sparsity"], "test/acc", ["cost.flops_infer_sparse"])
    md = to_markdown(absent)
    assert "| 90% flops_infer_sparse |" in md and md.count("| — |") == 2
    assert "cost.flops_infer_sparse: absent from every completed run" in md


# -- published numbers -------------------------------------------------------------------
def _published() -> Published:
    def entry(value, **conditions):
        return PublishedEntry(conditions, value / 100, "test/acc", "Paper 2020")

    return Published(
        "demo",
        "Paper 2020",
        "a note",
        [
            entry(98.0, pruning="dense"),
            entry(90.0, pruning=["rigl", "dynamic"], sparsity=0.9, distribution="erk"),
            entry(10.0, pruning="rigl", sparsity=0.9, distribution="uniform"),
            entry(50.0, pruning="rigl", sparsity=0.8, dataset="cifar10"),
        ],
    )


def test_published_values_and_differences_match_cells(grid):
    table = aggregate(grid, ["pruning"], ["sparsity"], "test/acc")
    matches = match_published(table, _published())
    assert matches[(("rigl",), (0.9,))].value == pytest.approx(0.90)  # erk, not uniform
    assert (("rigl",), (0.8,)) not in matches  # other dataset
    assert all(matches[(("dense",), (sp,))].value == 0.98 for sp in (0.8, 0.9, 0.95))
    md = to_markdown(table, published=_published())
    assert "| 90.50 ± 0.71 (n=2) | 90.00 (+0.50) |" in md
    assert "80% pub. (Δ)" in md and "ours − published" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(table, published=_published()))))
    rigl90 = next(r for r in rows if r["pruning"] == "rigl" and r["sparsity"] == "0.9")
    assert float(rigl90["diff"]) == pytest.approx(0.005) and rigl90["published_source"]
    assert "pub. ($\\Delta$)" in to_latex(table, published=_published())


def test_published_files_load_with_sources(tmp_path):
    assert {"lenet300_mnist", "wrn22_2_cifar10", "mnist1d_lottery"} <= set(available())
    for name in available():
        published = load_published(name)
        assert published.source and published.note and published.entries
        assert all(e.source and 0 < e.value <= 1 for e in published.entries)
    lenet = load_published("lenet300_mnist")
    values = {
        (str(e.conditions["pruning"]), e.conditions.get("sparsity")): e for e in lenet.entries
    }
    assert values[("dense", None)].value == pytest.approx(0.9869)
    assert values[("snfs", 0.95)].value == pytest.approx(0.9853)
    assert values[("['rigl', 'dynamic']", 0.87)].value == pytest.approx(0.9852)
    assert lenet.entries[0].conditions["dataset"] == "mnist"
    wrn = {e.label: e.value for e in load_published("wrn22_2_cifar10").entries}
    assert wrn["RigL (ERK)"] == pytest.approx(0.931) and wrn["Static"] == pytest.approx(0.912)
    lottery = load_published("mnist1d_lottery").entries
    assert any(
        e.conditions
        == {"dataset": "mnist1d", "model": "mlp", "pruning": "imp_random", "sparsity": 0.99}
        and e.value == pytest.approx(0.169)
        for e in lottery
    )
    with pytest.raises(FileNotFoundError, match="lenet300_mnist"):
        load_published("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: x\nentries:\n  - {pruning: rigl}\n")
    with pytest.raises(ValueError, match="value"):
        load_published(bad)


def test_published_file_matches_runs_of_its_dataset_only():
    records = [rec("set", 0.9, dataset="mnist", model="lenet300_100", acc=0.98)]
    records += [rec("dense", 0.9, dataset="mnist", model="lenet300_100", acc=0.985)]
    table = aggregate(records, ["pruning"], ["sparsity"], "test/acc")
    md = to_markdown(table, published="lenet300_mnist")
    assert "| 98.00 (n=1) | 98.39 (-0.39) |" in md and "| 98.69 (-0.19) |" in md
    other = aggregate([rec("set", 0.9, acc=0.98)], ["pruning"], ["sparsity"], "test/acc")
    assert match_published(other, "lenet300_mnist") == {}


# -- W&B ---------------------------------------------------------------------------------
class FakeRun:
    def __init__(self, id, state, config, summary, group=None):
        self.id, self.state, self.config, self.summary, self.group = (
            id,
            state,
            config,
            summary,
            group,
        )
        self.name = f"run-{id}"


class FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.calls = []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return iter(self._runs)


def test_load_wandb_runs_builds_records_from_the_public_api():
    config = {k: v for k, v in make("rigl", 0.9).items() if k == "config"}["config"]
    runs = [
        FakeRun("a", "finished", config, {"test/acc": 0.91, "_step": 9, "cost/flops_train": 2e9}),
        FakeRun("b", "finished", {**config, "seed": 1}, {"test/acc": 0.93}),
        FakeRun("c", "crashed", {**config, "seed": 2}, {}),
        # Flattened and value-wrapped configs (as W&B's raw API can return them).
        FakeRun(
            "d",
            "finished",
            {"pruning/name": {"value": "dense"}, "sparsity": 0.9, "seed": 0},
            {"test/acc": 0.95},
        ),
    ]
    api = FakeApi(runs)
    records = load_wandb_runs(api, "me/prunelab", filters={"group": "g"})
    assert api.calls == [("me/prunelab", {"group": "g"})]
    a, b, c, d = records
    assert (a.status, a.get("pruning"), a.get("sparsity"), a.get("seed")) == (
        "completed",
        "rigl",
        0.9,
        0,
    )
    assert a.get("cost.flops_train") == 2e9 and a.get("_step") is None
    assert a.get("model") == "MLP" and a.source == "wandb:me/prunelab/a"
    assert c.status == "failed" and d.is_dense and d.get("sparsity") == 0.0
    table = aggregate(records, ["pruning"], ["sparsity"], "test/acc")
    cell = table.cell("rigl", 0.9)
    assert (cell.status, cell.n, cell.n_jobs) == (PARTIAL, 2, 3)
    assert cell.mean == pytest.approx(0.92)
    assert table.cell("dense", 0.9).mean == 0.95


# -- plots -------------------------------------------------------------------------------
def test_plots_write_pngs_and_skip_what_is_absent(tmp_path):
    from prunelab.report.plots import plot_all

    curve = [
        {
            "step": step,
            "sparsity/global": 0.9,
            "mask/turnover": 0.1 / (1 + step),
            "mask/itop_rate": 0.1 + step / 1000,
            "densities": {"a": 0.1},
        }
        for step in (0, 100, 200)
    ]
    records = [rec("dense", 0.9, seed=s, acc=0.9) for s in (0, 1)]
    records += [
        rec("rigl", sp, seed=s, acc=sp, sparsity_curve=curve) for sp in (0.8, 0.9) for s in (0, 1)
    ]
    written, notes = plot_all(records, tmp_path / "plots")
    assert set(written) == {"accuracy_vs_sparsity", "sparsity_curves"}
    assert all(p.stat().st_size > 1000 for p in written.values())
    assert notes == ["skipped accuracy_vs_flops: no completed run has cost.flops_train"]

    for r in records:
        r.data["cost"] = {"flops_train": 1e9 * (2 - r.get("sparsity"))}
    written, notes = plot_all(records, tmp_path / "plots2")
    assert "accuracy_vs_flops" in written and notes == []


def test_extra_relative_to_the_only_dense_baseline_across_other_keys():
    records = [rec("dense", 0.9, distribution="uniform", cost={"flops_train": 4e12})]
    records += [rec("rigl", 0.9, distribution="erk", cost={"flops_train": 2e12})]
    table = aggregate(
        records, ["pruning", "distribution"], ["sparsity"], "test/acc", ["cost.flops_train"]
    )
    assert table.cell(("rigl", "erk"), 0.9).dense_ref == {"cost.flops_train": 4e12}
    assert "| 0.50× |" in to_markdown(table)


def _run(pruning: str, sparsity: float) -> Record:
    config = {"pruning": {"name": pruning}, "sparsity": sparsity, "seed": 0}
    return Record(data={"status": "completed", "config": config}, source=pruning)


def test_where_keeps_runs_whose_key_is_one_of_the_values():
    runs = [_run("imp", 0.5), _run("imp", 0.9), _run("rigl", 0.9), _run("imp_random", 0.95)]
    kept = filter_records(runs, ["sparsity=0.9,0.95", "pruning=imp,imp_random"])
    assert [(r.get("pruning"), r.get("sparsity")) for r in kept] == [
        ("imp", 0.9),
        ("imp_random", 0.95),
    ]
    assert filter_records(runs, []) == runs
    assert [r.get("sparsity") for r in filter_records(runs, ["sparsity!=0.9"])] == [0.5, 0.95]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        filter_records(runs, ["sparsity"])


def test_a_completed_run_of_sub_runs_is_left_to_its_sub_runs(tmp_path):
    for sub, data in {
        "imp": {"status": "completed", "sub_runs": [{"level": 0}], "config": {}},
        "imp/levels/level_00": {"status": "completed", "config": {"sparsity": 0.0}},
    }.items():
        (tmp_path / sub).mkdir(parents=True)
        files.results_path(tmp_path / sub).write_text(json.dumps(data))
    found = find_records([tmp_path])
    assert [Path(r.source).name for r in found] == ["level_00"]


def test_many_sparsities_are_drawn_on_a_log_density_axis(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from prunelab.report import plots

    axes = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: axes.extend(fig.axes))
    few = [rec("imp", sp, seed=0, acc=0.7) for sp in (0.5, 0.9)]
    plots.plot_accuracy_vs_sparsity(few, tmp_path / "few.png")
    assert axes[-1].get_xscale() == "linear"
    levels = [round(1 - 0.8**i, 4) for i in range(1, 16)]  # IMP-like: 15 levels
    many = [rec("imp", sp, seed=0, acc=0.7) for sp in levels]
    plots.plot_accuracy_vs_sparsity(many, tmp_path / "many.png")
    ax = axes[-1]
    assert ax.get_xscale() == "function"
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["50%", "80%", "90%", "95%"]
    assert plots._from_log_density(plots._log_density(0.99)) == pytest.approx(0.99)
