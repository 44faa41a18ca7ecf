"""The one place that names the files a run writes.

Every reader and writer of run artefacts asks this module for the path, so a rename is a
one-line change and tables built from old runs keep finding their inputs.
"""

from pathlib import Path

# Where runs write by default (paths.log_dir), relative to the repository root.
OUTPUTS_DIR = "outputs"
RESULTS = "results.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"
# The engine's final masks, next to the checkpoints (written when a run logs W&B artifacts).
MASKS = "masks.pt"
CSV_DIR = "csv"
METRICS_CSV = "metrics.csv"
WANDB_DIR = "wandb"
HYDRA_DIR = ".hydra"
# Exports of a trained run (eval.py --export).
EXPORT_DIR = "export"
EXPORT_STATE_DICT = "state_dict.pt"
EXPORT_SPARSE = "sparse.pt"
EXPORT_ONNX = "model.onnx"
# The compacted model (whole pruned channels removed), when the masks allow one.
EXPORT_COMPACT = "compact.pt"
EXPORT_COMPACT_ONNX = "model_compact.onnx"
EXPORT_REPORT = "export.json"
# The per-machine cache of sparse-kernel choices (prunelab.cost.latency autotune).
SPARSE_KERNEL_CACHE = "sparse_kernels.json"
# The run's quantization step (conf/quantize): its files, in <run>/quantize/.
QUANTIZE_DIR = "quantize"
QUANT_FP32_ONNX = "model_fp32.onnx"
QUANT_INT8_ONNX = "model_int8.onnx"
DEEP_COMPRESSION = "deep_compression.bin"
# eval.py's int8 exports: a packed sparse checkpoint with int8 values, an int8 ONNX file.
EXPORT_SPARSE_INT8 = "sparse_int8.pt"
EXPORT_ONNX_INT8 = "model_int8.onnx"
# Iterative magnitude pruning: one sub-run folder per level (and branch), the rewind point.
IMP_LEVELS_DIR = "levels"
IMP_REWIND_WEIGHTS = "rewind.pt"
# Files Hydra writes in HYDRA_DIR of every job.
HYDRA_OVERRIDES = "overrides.yaml"
HYDRA_CONFIG = "config.yaml"
HYDRA_HYDRA = "hydra.yaml"


def results_path(run_dir: str | Path) -> Path:
    """The results record of a run."""
    return Path(run_dir) / RESULTS


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where Lightning checkpoints of a run go."""
    return Path(run_dir) / CHECKPOINT_DIR


def last_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint written at the end of every epoch (used to resume)."""
    return checkpoint_dir(run_dir) / LAST_CHECKPOINT


def masks_path(run_dir: str | Path) -> Path:
    """The final masks of a run (``{name: bool tensor}``), next to its checkpoints."""
    return checkpoint_dir(run_dir) / MASKS


def csv_metrics(run_dir: str | Path) -> Path:
    """The CSV log of every logged metric of a run."""
    return Path(run_dir) / CSV_DIR / METRICS_CSV


def export_dir(run_dir: str | Path) -> Path:
    """Where eval.py writes a run's exported model files."""
    return Path(run_dir) / EXPORT_DIR


def quantize_dir(run_dir: str | Path) -> Path:
    """``<run>/quantize/``: the files of the run's quantization step."""
    return Path(run_dir) / QUANTIZE_DIR


def imp_levels_dir(run_dir: str | Path) -> Path:
    """Where an IMP run keeps its levels' sub-runs."""
    return Path(run_dir) / IMP_LEVELS_DIR


def imp_level_dir(run_dir: str | Path, level: int, branch: str | None = None) -> Path:
    """The sub-run of IMP level ``level`` (``level_03``), or of a control branch at that
    level (``level_03_random``)."""
    return imp_levels_dir(run_dir) / (f"level_{level:02d}" + (f"_{branch}" if branch else ""))


def imp_rewind_weights(run_dir: str | Path) -> Path:
    """The model state an IMP run rewinds to (saved at ``pruning.rewind_step`` of level 0)."""
    return Path(run_dir) / IMP_REWIND_WEIGHTS


# Sensitivity analysis of a run (scripts/sensitivity.py): its files, in <run>/sensitivity/.
SENSITIVITY_DIR = "sensitivity"
SENSITIVITY_JSON = "sensitivity.json"
SENSITIVITY_TABLE = "sensitivity.md"
SENSITIVITY_PLOT = "sensitivity.png"


def sensitivity_dir(run_dir: str | Path) -> Path:
    """``<run>/sensitivity/``: the layer sensitivity curves of a run (table, JSON, plot)."""
    return Path(run_dir) / SENSITIVITY_DIR


def sensitivity_json(run_dir: str | Path) -> Path:
    """The sensitivity curves of a run, which ``distribution.curves`` may name."""
    return sensitivity_dir(run_dir) / SENSITIVITY_JSON


# Adaptive pruning (pruning=adaptive): the dense stage and every tried sparsity as sub-runs,
# in <run>/search/.
ADAPTIVE_DIR = "search"
ADAPTIVE_DENSE = "dense"


def adaptive_dir(run_dir: str | Path) -> Path:
    """Where an adaptive run keeps its sub-runs."""
    return Path(run_dir) / ADAPTIVE_DIR


def adaptive_point_dir(run_dir: str | Path, step: int | None, sparsity: float = 0.0) -> Path:
    """The sub-run of an adaptive run's dense stage (``step`` None: ``dense``) or of its
    ``step``-th tried sparsity (``step_02_s0.9293``)."""
    name = ADAPTIVE_DENSE if step is None else f"step_{step:02d}_s{sparsity:.4f}"
    return adaptive_dir(run_dir) / name
