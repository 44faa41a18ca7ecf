"""Evaluate and export a finished run: ``python eval.py ckpt_path=<run>/checkpoints/last.ckpt``.

Rebuilds the run's datamodule and model from its results record, loads the checkpoint
with the engine's masks, measures test accuracy, writes the three exports of
:func:`prunelab.cost.export.export_all` (plain state dict with zeros in place, compact
sparse checkpoint, ONNX), reloads each one and measures its test accuracy again (ONNX
through onnxruntime), and writes ``export/export.json`` with accuracies and file sizes.
When the masks prune whole channels or neurons, the compacted model
(:func:`prunelab.cost.export.export_compact`: ``compact.pt``, ``model_compact.onnx``) is
exported, reloaded and tested too, with its parameter count and MACs under ``compact`` in
``export.json``; otherwise ``compact`` is null and ``compact_reason`` says why.

``eval.py`` is a Hydra app on ``conf/eval.yaml`` (overrides, ``-m`` sweeps over checkpoints);
the older form ``python eval.py <run dir> [--checkpoint last|best]`` still works. Mistakes
(no such checkpoint, no completed run, unknown key) are one ``error:`` line and exit status 2,
found before Hydra starts.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from prunelab import files
from prunelab.config import CONF_DIR, check_overrides, check_sweep_tags, check_tags
from prunelab.errors import ConfigError
from prunelab.tracking.results import read_record, write_json_atomic

log = logging.getLogger(__name__)


@torch.no_grad()
def accuracy(predict: Any, batches: Any) -> float:
    """Top-1 accuracy of ``predict(x) -> logits`` over (x, y) batches."""
    correct = total = 0
    for x, y in batches:
        logits = torch.as_tensor(predict(x))
        correct += int((logits.argmax(dim=1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


CHECKPOINTS = ("last", "best")
# Hydra's command-line flags that take a value (not a run folder), and --info's values.
_VALUE_FLAGS = frozenset(
    {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
    | {"--config-dir", "-cd", "--experimental-rerun"}
)
_INFO_FLAGS = frozenset({"--info", "-i"})
_INFO_VALUES = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})
_CHECKPOINT_KEYS = ("ckpt_path", "run_dir", "checkpoint")
# Flags after which Hydra runs no job (help, config printing).
_NO_RUN_FLAGS = frozenset(
    {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion"}
)
# Jobs of this process's sweep that failed (the exit status says so at the end).
_failed_jobs: list[str] = []


def check_run(run_dir: Path) -> None:
    """A run folder must hold a completed results record (one ConfigError line otherwise)."""
    record = read_record(run_dir)
    if record is None or record.get("status") != "completed":
        raise ConfigError(f"{run_dir} has no completed {files.RESULTS}; pass a finished run")


def _run_of(ckpt: Path) -> Path:
    """The run folder of a checkpoint file: the nearest folder above it with a results record
    (relative when ``ckpt`` is)."""
    for folder in Path(os.path.abspath(ckpt)).parents:
        if files.results_path(folder).is_file():
            return folder if ckpt.is_absolute() else Path(os.path.relpath(folder))
    raise ConfigError(
        f"no {files.RESULTS} above {ckpt}; pass a checkpoint inside a run folder "
        f"(<run>/{files.CHECKPOINT_DIR}/{files.LAST_CHECKPOINT})"
    )


def _chosen_sub_run(run: Path) -> Path:
    """An adaptive run keeps its model in the sub-run it chose (``<run>/search/<point>``);
    an IMP run in its levels. Other runs are their own."""
    record = read_record(run) or {}
    chosen = (record.get("adaptive") or {}).get("chosen")
    if chosen and chosen.get("run_dir"):
        sub = files.adaptive_dir(run) / Path(chosen["run_dir"]).name
        check_run(sub)
        log.info("adaptive run: evaluating its chosen point %s", sub)
        return sub
    levels = files.imp_levels_dir(run)
    if levels.is_dir() and not files.checkpoint_dir(run).is_dir():
        raise ConfigError(
            f"{run} is an IMP run; its models are its levels: pass one, e.g. "
            f"python eval.py {files.imp_level_dir(run, 1)}"
        )
    return run


def _check_static(run: Path) -> None:
    """Exports and reloads hold one fixed model; an input-adaptive run (fbs) computes other
    channels for every input, so its figures come from its record and its own script."""
    from prunelab.methods import METHODS

    record = read_record(run) or {}
    name = (record.get("choices") or {}).get("pruning")
    if name in METHODS and METHODS[name].input_adaptive:
        raise ConfigError(
            f"{run} is an input-adaptive (pruning={name}) run: its per-input MACs and dynamic "
            f"latency are in its {files.RESULTS}; re-time it with scripts/fbs_table.py --retime <folder>"
        )


def resolve_checkpoint(
    ckpt_path: str | Path | None = None,
    run_dir: str | Path | None = None,
    checkpoint: str = "last",
) -> tuple[Path, Path, str]:
    """``(run folder, checkpoint file, label)`` for eval's options, checked to exist and to
    belong to a completed run; ``label`` is ``last`` or ``best`` for the run's own files, else
    the file name. Raises ConfigError (one line) on any mistake, before anything is loaded.
    """
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(
            f"checkpoint must be last or best, got {checkpoint!r}; e.g. checkpoint=best"
        )
    if ckpt_path is None and run_dir is None:
        raise ConfigError(
            "no checkpoint given; e.g. python eval.py ckpt_path=<run>/checkpoints/last.ckpt "
            "(or python eval.py <run folder>)"
        )
    if ckpt_path is not None and run_dir is not None:
        raise ConfigError(f"pass ckpt_path or run_dir, not both (got {ckpt_path} and {run_dir})")
    if ckpt_path is not None and not Path(ckpt_path).is_dir():
        ckpt = Path(ckpt_path)
        if not ckpt.is_file():
            raise ConfigError(f"no checkpoint {ckpt}; pass an existing .ckpt file or a run folder")
        run = _run_of(ckpt)
        check_run(run)
        names = {files.LAST_CHECKPOINT: "last", files.BEST_CHECKPOINT: "best"}
        own = ckpt.resolve().parent == files.checkpoint_dir(run).resolve()
        return run, ckpt, names[ckpt.name] if own and ckpt.name in names else ckpt.name
    run = Path(ckpt_path if ckpt_path is not None else run_dir)
    check_run(run)
    run = _chosen_sub_run(run)
    _check_static(run)
    name = files.LAST_CHECKPOINT if checkpoint == "last" else files.BEST_CHECKPOINT
    ckpt = files.checkpoint_dir(run) / name
    if not ckpt.is_file():
        other = "best" if checkpoint == "last" else "last"
        raise ConfigError(f"no checkpoint {ckpt}; try checkpoint={other} (--checkpoint {other})")
    return run, ckpt, checkpoint


def load_run(
    run_dir: Path, which: str = "last", ckpt_path: str | Path | None = None
) -> dict[str, Any]:
    """The run's config, datamodule (set up for test), model with checkpoint weights, masks.

    ``ckpt_path`` names the checkpoint file (default: the run's ``which`` = last or best).
    """
    from prunelab.train import build

    run_dir = Path(run_dir)
    check_run(run_dir)
    record = read_record(run_dir)
    if ckpt_path is None:
        name = files.LAST_CHECKPOINT if which == "last" else files.BEST_CHECKPOINT
        ckpt_path = files.checkpoint_dir(run_dir) / name
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise ConfigError(f"no checkpoint {ckpt_path}; use --checkpoint last or best")
    cfg = OmegaConf.create(record["config"])
    built = build(cfg)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    built["module"].load_state_dict(checkpoint["state_dict"])
    engine = built["engine"]
    engine.load_state_dict(checkpoint["sparsity_engine"])
    datamodule = built["datamodule"]
    datamodule.setup("test")
    model = built["model"].eval()
    return {"record": record, "model": model, "masks": engine.masks, "datamodule": datamodule}


def evaluate_and_export(
    run_dir: str | Path,
    which: str = "last",
    ckpt_path: str | Path | None = None,
    export_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Export the run's model three ways and check each reload's test accuracy.

    ``ckpt_path`` evaluates that checkpoint file instead of the run's ``which`` (last or
    best); ``export_dir`` is where the files and ``export.json`` go (default: the run's
    ``export/``).
    """
    import onnxruntime

    from prunelab.cost.export import (
        export_all,
        export_compact,
        load_compact_checkpoint,
        load_sparse_checkpoint,
    )

    run_dir = Path(run_dir)
    out = Path(export_dir) if export_dir is not None else files.export_dir(run_dir)
    run = load_run(run_dir, which, ckpt_path)
    model, masks, dm = run["model"], run["masks"], run["datamodule"]
    shape = tuple(dm.input_shape)
    test = list(dm.test_dataloader())
    paths = export_all(model, masks, shape, out)
    reference = accuracy(model, test)

    plain = copy.deepcopy(model)
    plain.load_state_dict(torch.load(paths["state_dict"], map_location="cpu", weights_only=True))
    sparse = load_sparse_checkpoint(paths["sparse"], copy.deepcopy(model)).eval()
    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])

    def onnx_predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    report = {
        "run_dir": str(run_dir),
        "checkpoint": which,
        "ckpt_path": str(
            ckpt_path
            if ckpt_path is not None
            else files.checkpoint_dir(run_dir)
            / (files.LAST_CHECKPOINT if which == "last" else files.BEST_CHECKPOINT)
        ),
        "test_acc": {
            "checkpoint": reference,
            "state_dict": accuracy(plain.eval(), test),
            "sparse": accuracy(sparse, test),
            "onnx": accuracy(onnx_predict, test),
        },
        "bytes": {name: path.stat().st_size for name, path in paths.items()},
        "files": {name: str(path) for name, path in paths.items()},
    }
    report["sparse_vs_state_dict"] = report["bytes"]["state_dict"] / report["bytes"]["sparse"]
    _quantized_exports(report, run_dir, model, masks, dm, test, out)
    compacted = export_compact(model, masks, shape, out)
    if isinstance(compacted, str):
        report["compact"], report["compact_reason"] = None, compacted
    else:
        cpaths, _, creport = compacted
        reloaded = load_compact_checkpoint(cpaths["compact"], model, masks)
        csession = onnxruntime.InferenceSession(
            str(cpaths["compact_onnx"]), providers=["CPUExecutionProvider"]
        )

        def compact_onnx_predict(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(csession.run(None, {"input": x.numpy()})[0])

        report["test_acc"]["compact"] = accuracy(reloaded, test)
        report["test_acc"]["compact_onnx"] = accuracy(compact_onnx_predict, test)
        for name, path in cpaths.items():
            report["bytes"][name] = path.stat().st_size
            report["files"][name] = str(path)
        report["compact"] = {
            "params_before": creport.params_before,
            "params": sum(p.numel() for p in reloaded.parameters()),
            "macs_before": _macs(model, shape),
            "macs": _macs(reloaded, shape),
            "channels_removed": creport.channels_removed,
            "max_abs_diff": creport.max_abs_diff,
        }
    write_json_atomic(out / files.EXPORT_REPORT, report)
    return report


def _quantized_exports(
    report: dict[str, Any],
    run_dir: Path,
    model: Any,
    masks: Any,
    dm: Any,
    test: list,
    out: Path,
    bits: int = 6,
) -> None:
    """Add the quantized artefacts to ``report`` (written to ``out``, reloaded and tested):
    ``sparse_int8.pt`` (packed mask + int8 values), ``model_int8.onnx`` (onnxruntime static
    int8, calibrated on 16 training batches), ``deep_compression.bin`` (k-means weight
    sharing at ``bits`` bits without centroid fine-tuning, relative indices, Huffman coding);
    and, when the run quantized itself (conf/quantize), its int8 / deep-compression files
    reloaded against the accuracy its record holds."""
    from prunelab.cost.export import load_sparse_checkpoint, save_sparse_checkpoint
    from prunelab.quantize import (
        load_compressed,
        load_int8,
        quantize_int8,
        save_compressed,
        share_weights,
    )

    shape = tuple(dm.input_shape)
    paths = {
        "sparse_int8": out / files.EXPORT_SPARSE_INT8,
        "onnx_int8": out / files.EXPORT_ONNX_INT8,
    }
    save_sparse_checkpoint(model, masks, paths["sparse_int8"], values="int8")
    sparse8 = load_sparse_checkpoint(paths["sparse_int8"], copy.deepcopy(model)).eval()
    report["test_acc"]["sparse_int8"] = accuracy(sparse8, test)
    int8 = quantize_int8(model, masks, list(dm.train_dataloader()), shape, paths["onnx_int8"])
    report["test_acc"]["onnx_int8"] = accuracy(load_int8(paths["onnx_int8"]), test)
    report["int8"] = {"layers_fp32": int8.report.fp32, "note": int8.report.note}
    shared_model = copy.deepcopy(model).cpu()
    shared = share_weights(shared_model, masks, bits)
    paths["deep_compression"] = out / files.DEEP_COMPRESSION
    compressed = save_compressed(shared_model, masks, shared, paths["deep_compression"])
    reloaded = load_compressed(paths["deep_compression"], copy.deepcopy(model)).eval()
    report["test_acc"]["deep_compression"] = accuracy(reloaded, test)
    report["deep_compression"] = {
        "bits": bits,
        "centroid_finetuning": False,
        "ratio_vs_dense_file": compressed.ratio_vs_dense_file,
        "parts": compressed.parts,
    }
    for name, path in paths.items():
        report["bytes"][name] = path.stat().st_size
        report["files"][name] = str(path)
    # the run's own quantized files (quantize=int8_ptq/qat/deep_compression)
    record = read_record(run_dir) or {}
    cost = record.get("cost") or {}
    qdir = files.quantize_dir(run_dir)
    checks = {}
    if (qdir / files.QUANT_INT8_ONNX).is_file() and "quant_accuracy_int8" in cost:
        acc = accuracy(load_int8(qdir / files.QUANT_INT8_ONNX), test)
        checks["int8"] = {"recorded": cost["quant_accuracy_int8"], "reloaded": acc}
        report["bytes"]["run_onnx_int8"] = (qdir / files.QUANT_INT8_ONNX).stat().st_size
    if (qdir / files.DEEP_COMPRESSION).is_file() and "quant_accuracy_shared" in cost:
        net = load_compressed(qdir / files.DEEP_COMPRESSION, copy.deepcopy(model)).eval()
        checks["deep_compression"] = {
            "recorded": cost["quant_accuracy_shared"],
            "reloaded": accuracy(net, test),
        }
        report["bytes"]["run_deep_compression"] = (qdir / files.DEEP_COMPRESSION).stat().st_size
    if checks:
        report["run_quantized"] = checks


def _macs(model: Any, shape: tuple[int, ...]) -> float:
    """Dense forward MACs of one sample (:func:`prunelab.cost.flops.layer_flops`)."""
    from prunelab.cost.flops import layer_flops

    return layer_flops(model, shape).total / 2


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """One eval job: the composed ``conf/eval.yaml`` -> :func:`evaluate_and_export`."""
    from prunelab.config import check_extras
    from prunelab.tracking.extras import apply_extras

    check_extras(cfg)
    check_tags(cfg, _is_multirun())
    run_dir, ckpt, which = resolve_checkpoint(
        cfg.get("ckpt_path"), cfg.get("run_dir"), str(cfg.get("checkpoint", "last"))
    )
    apply_extras(cfg)
    export_dir = cfg.get("export_dir")
    return evaluate_and_export(run_dir, which, ckpt_path=ckpt, export_dir=export_dir)


def print_report(report: dict[str, Any]) -> None:
    """The accuracies and sizes of :func:`evaluate_and_export`'s report, one line each."""
    print(f"{report['ckpt_path']}:")
    for name, acc in report["test_acc"].items():
        size = report["bytes"].get(name)
        print(f"{name:>11}: test/acc {acc:.6f}" + (f"  {size:,} bytes" if size else ""))
    print(f"sparse checkpoint is {report['sparse_vs_state_dict']:.2f}x smaller than the state dict")
    compact = report.get("compact")
    if compact:
        print(f"compacted model: {compact['params_before']:,} -> {compact['params']:,} parameters")
    else:
        print(f"no compacted model: {report.get('compact_reason')}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        report = evaluate(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        if _is_multirun():  # one bad checkpoint must not stop the sweep
            _failed_jobs.append(str(err))
            return None
        sys.exit(2)
    except Exception as err:
        if _is_multirun():
            log.exception("eval job failed; the sweep goes on")
            _failed_jobs.append(str(err))
            return None
        raise
    print_report(report)
    return report["test_acc"]["checkpoint"]


def _quote(value: str) -> str:
    """A command-line value as a quoted Hydra string (any path survives Hydra's grammar).

    In a quoted Hydra string backslashes are literal except before a quote (or the closing
    quote), where each pair stands for one; a quote is escaped with one."""

    def escape(match: re.Match) -> str:
        return match.group(1) * 2 + ("\\'" if match.group(2) else "")

    return "'" + re.sub(r"(\\*)('|$)", escape, value) + "'"


def legacy_argv(argv: list[str]) -> list[str]:
    """Translate the older ``eval.py <run dir> [--checkpoint last|best]`` into overrides
    (``run_dir=... checkpoint=...``); Hydra's own flags and overrides pass unchanged."""
    out: list[str] = []
    runs: list[str] = []
    i = 0
    while i < len(argv):
        arg, following = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--checkpoint" and following is not None:
            out.append(f"checkpoint={following}")
            i += 2
        elif following is not None and (
            arg in _VALUE_FLAGS or (arg in _INFO_FLAGS and following in _INFO_VALUES)
        ):
            out.extend((arg, following))
            i += 2
        else:
            if arg.startswith("--checkpoint="):
                out.append(f"checkpoint={arg.partition('=')[2]}")
            elif not arg.startswith("-") and ("=" not in arg or Path(arg).exists()):
                runs.append(arg)
            else:
                out.append(arg)
            i += 1
    if len(runs) > 1:
        raise ConfigError(
            f"one run folder at a time, got {len(runs)}; for several, sweep: "
            "python eval.py -m ckpt_path=<run a>,<run b>"
        )
    return [*(f"run_dir={_quote(r)}" for r in runs), *out]


def _values(argv: list[str], key: str) -> list[Any] | None:
    """The values the last override of ``key`` on the command line gives (each of a sweep);
    ``[None]`` when there is none; None when one cannot be checked here (an interpolation or
    a value Hydra's grammar rejects: the job, or Hydra, reports it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for arg in reversed(argv):
        if arg.startswith("-") or arg.partition("=")[0].lstrip("+") != key:
            continue
        try:
            parsed = OverridesParser.create().parse_override(arg)
        except Exception:
            return None
        values = list(parsed.sweep_iterator()) if parsed.is_sweep_override() else [parsed.value()]
        if any("${" in str(v) for v in values):
            return None
        return [None if v is None else str(v) for v in values]
    return [None]


def check_checkpoints(argv: list[str]) -> None:
    """Every checkpoint the command line names exists and belongs to a completed run (one
    ConfigError line otherwise), checked before Hydra starts; each job checks again."""
    if any(a in _NO_RUN_FLAGS for a in argv):
        return
    ckpts, runs, names = (_values(argv, key) for key in _CHECKPOINT_KEYS)
    if ckpts is None or runs is None or names is None:
        return
    for ckpt in ckpts:
        for run in runs:
            for name in names:
                resolve_checkpoint(ckpt, run, name if name is not None else "last")


def main(argv: list[str] | None = None) -> int:
    """Console entry of ``eval.py``: check the command line, then run the Hydra app.

    Returns 0, or 2 after a one-line error (also when a job of a sweep failed).
    """
    os.environ.setdefault("PROJECT_ROOT", str(CONF_DIR.parent))
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = legacy_argv(argv)
        check_overrides(argv, config_name="eval")
        check_sweep_tags(argv, config_name="eval")
        check_checkpoints(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    _failed_jobs.clear()
    try:
        _hydra_main()
    finally:
        sys.argv = saved
    return 2 if _failed_jobs else 0
