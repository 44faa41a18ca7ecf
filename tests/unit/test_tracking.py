from rich.console import Console

from prunelab.tracking import wandb_setup
from prunelab.tracking.summary import print_summary, summary_rows


def test_wandb_mode_env_wins(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_setup.resolve_mode("online") == "disabled"


def test_wandb_auto_is_offline_without_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert not wandb_setup.has_api_key()
    assert wandb_setup.resolve_mode("auto") == "offline"
    assert wandb_setup.resolve_mode("offline") == "offline"


def test_wandb_auto_is_offline_when_server_unreachable(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: refused at once
    assert wandb_setup.has_api_key()
    assert not wandb_setup.server_reachable(timeout_s=0.5)
    assert wandb_setup.resolve_mode("auto") == "offline"


def test_wandb_disabled_gives_no_logger(tmp_path):
    assert wandb_setup.make_wandb_logger({"enabled": False}, tmp_path, "n", [], {}) is None


def test_summary_lists_the_run():
    record = {
        "status": "completed",
        "run_dir": "outputs/runs/x",
        "choices": {"dataset": "mnist1d", "model": "mlp", "pruning": "dynamic"},
        "config": {"pruning": {"name": "rigl"}, "sparsity": 0.9},
        "metrics": {"test/acc": 0.6123, "val/acc_best": 0.65},
        "sparsity": {"global": 0.9},
        "n_params": 15210,
        "n_prunable": 15000,
        "wall_time_s": 12.3,
    }
    rows = dict(summary_rows(record))
    assert rows["method"] == "rigl" and rows["target sparsity"] == "0.9"
    assert rows["test accuracy"] == "61.23%" and rows["parameters"].startswith("15,210")
    console = Console(record=True, width=100)
    print_summary(record, console)
    text = console.export_text()
    assert "mnist1d" in text and "61.23%" in text and "outputs/runs/x" in text


def test_summary_shows_cost_when_present():
    cost = {
        "flops_infer_sparse": 3000.0,
        "theoretical_speedup": 10.0,
        "bytes_csr": 13 * 1024,
        "bytes_dense_fp32": 60 * 1024,
        "flops_train": 1.99e9,
        "flops_train_x_dense": 0.1,
        "latency_ms/dense/b256": 0.2,
        "latency_ms/sparse/b256": 0.1,
    }
    rows = dict(summary_rows({"cost": cost, "config": {}, "sparsity": {}}))
    assert rows["inference FLOPs"].startswith("3,000 / sample (10.00x")
    assert rows["training FLOPs"] == "1.99e+09 (0.10x dense)"
    assert rows["size"] == "13.0 KiB sparse (CSR) vs 60.0 KiB dense"
    assert rows["latency b256"] == "0.100 ms sparse vs 0.200 ms dense"
    assert "inference FLOPs" not in dict(summary_rows({"config": {}, "sparsity": {}}))


def test_summary_says_when_latency_was_measured_under_load():
    cost = {
        "flops_infer_sparse": 3000.0,
        "bytes_csr": 1024,
        "bytes_dense_fp32": 4096,
        "latency_ms/dense/b256": 0.2,
        "latency_ms/sparse/b256": 0.1,
        "latency_threads": 1,
    }
    quiet = dict(summary_rows({"cost": cost, "config": {}, "sparsity": {}}))
    assert quiet["latency b256"] == "0.100 ms sparse vs 0.200 ms dense (1 thread)"
    loaded = {**cost, "latency_under_load": True}
    rows = dict(summary_rows({"cost": loaded, "config": {}, "sparsity": {}}))
    assert rows["latency b256"].endswith("(1 thread, under load: parallel sweep)")


def test_progress_bar_redraws_at_most_twice_a_second_and_at_the_last_batch(monkeypatch):
    from types import SimpleNamespace

    from pytorch_lightning.callbacks import RichProgressBar

    from prunelab.tracking import progress
    from prunelab.tracking.progress import ThrottledRichProgressBar

    drawn: list[int] = []
    monkeypatch.setattr(RichProgressBar, "on_train_epoch_start", lambda *a: None)
    monkeypatch.setattr(
        RichProgressBar, "on_train_batch_end", lambda self, t, m, o, b, i: drawn.append(i)
    )
    clock = iter([10.0, 10.1, 10.2, 10.6, 10.7, 10.8])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = ThrottledRichProgressBar()
    trainer = SimpleNamespace(max_epochs=1, max_steps=-1, num_training_batches=6)
    monkeypatch.setattr(ThrottledRichProgressBar, "trainer", property(lambda self: trainer))
    bar.on_train_epoch_start(trainer, None)
    for i in range(6):
        bar.on_train_batch_end(trainer, None, None, None, i)
    assert drawn == [0, 3, 5]  # the first, then 0.5 s later, and the last batch


def test_summary_shows_what_an_input_adaptive_run_spends_per_input():
    from prunelab.tracking.summary import _cost_rows

    cost = {
        "flops_infer_sparse": 2e6,
        "bytes_csr": 2048,
        "bytes_dense_fp32": 1024,
        "macs_dynamic_mean": 250_000,
        "macs_dynamic_x_dense": 4.0,
        "macs_dynamic_p50": 240_000,
        "macs_dynamic_p99": 400_000,
        "latency_ms/dynamic/b1": 0.5,
        "latency_ms/dense_plain/b1": 1.0,
        "dynamic_speedup_b1": 2.0,
    }
    rows = dict(_cost_rows(cost))
    assert rows["dynamic execution"] == (
        "250,000 MACs / input on average (4.00x fewer than dense; p50 240,000, p99 400,000)"
    )
    assert rows["dynamic latency b1"] == "0.500 ms vs 1.000 ms dense (2.00x)"
