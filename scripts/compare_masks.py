"""Compare the final masks of several runs: Jaccard overlap and Hamming distance.

    python scripts/compare_masks.py outputs/runs/train/<run_a> outputs/runs/train/<run_b>
    python scripts/compare_masks.py outputs/multiruns/train/<time>/{0,1,2} \\
        --out outputs/plots/mask_jaccard.png --json outputs/plots/mask_compare.json
    python scripts/compare_masks.py <imp_run> <imp_run>/levels/level_02 <rigl_run>

Each RUN is a run folder (its ``checkpoints/last.ckpt``), an IMP level folder
(``<run>/levels/level_NN``), an IMP run folder (its last lottery level) or a ``.ckpt`` file.
The masks are the sparsity engine's masks saved in the checkpoint. Prints, in Markdown, the
runs (labelled method/sparsity/seed[/level] from their results.json), the global and
per-layer Jaccard overlap and Hamming distance of every pair, and the matrix of global
Jaccard overlaps, which it also draws as a heat map (``--out``). A folder without a
checkpoint, or runs whose masks cover different layers, stop it with a one-line error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prunelab import files  # noqa: E402
from prunelab.analysis.compare import (  # noqa: E402
    check_same_layers,
    compare_masks,
    jaccard_matrix,
)
from prunelab.report.records import Record  # noqa: E402
from prunelab.sparsity.masks import Masks  # noqa: E402

DEFAULT_OUT = Path("outputs/plots/mask_jaccard.png")
_LEVEL = re.compile(r"level_(\d+)")


class CompareError(Exception):
    """A one-line reason why the runs cannot be compared."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Jaccard overlap and Hamming distance between the final masks of runs."
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders, IMP level folders or .ckpt files"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"heat-map PNG ({DEFAULT_OUT})"
    )
    parser.add_argument("--json", type=Path, help="also write every comparison as JSON here")
    parser.add_argument(
        "--global-only", action="store_true", help="leave the per-layer rows out of the table"
    )
    parser.add_argument("--digits", type=int, default=3, help="decimals in the tables (3)")
    return parser.parse_args(argv)


# -- loading ---------------------------------------------------------------------------------
def resolve(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint) of a RUN argument; an IMP run folder means its last lottery
    level (the highest ``level_NN`` without a branch suffix)."""
    if path.is_file():
        if path.suffix != ".ckpt":
            raise CompareError(f"{path}: not a run folder or a .ckpt file")
        run_dir = path.parent.parent if path.parent.name == files.CHECKPOINT_DIR else path.parent
        return run_dir, path
    if not path.is_dir():
        raise CompareError(f"{path}: no such folder")
    levels = files.imp_levels_dir(path)
    lottery = [d for d in (levels.iterdir() if levels.is_dir() else []) if _LEVEL.fullmatch(d.name)]
    if lottery:
        last = max(lottery, key=lambda d: int(d.name.split("_")[1]))
        ckpt = files.last_checkpoint(last)
        if not ckpt.exists():
            raise CompareError(
                f"{path}: its last IMP level {last.name} has no checkpoint "
                f"({files.CHECKPOINT_DIR}/{files.LAST_CHECKPOINT})"
            )
        return last, ckpt
    ckpt = files.last_checkpoint(path)
    if not ckpt.exists():
        raise CompareError(
            f"{path}: no checkpoint (looked for {files.CHECKPOINT_DIR}/{files.LAST_CHECKPOINT})"
        )
    return path, ckpt


def load_masks(ckpt: Path) -> Masks:
    """The sparsity engine's masks saved in a Lightning checkpoint (on the CPU)."""
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise CompareError(f"{ckpt}: cannot be read ({type(err).__name__})") from None
    engine = state.get("sparsity_engine") if isinstance(state, dict) else None
    masks = engine.get("masks") if isinstance(engine, dict) else None
    if not masks:
        raise CompareError(f"{ckpt}: holds no masks (no sparsity_engine state)")
    return Masks.from_state_dict(masks)


def label(run_dir: Path) -> str:
    """``method/sparsity/seed[/level]`` from the run's results.json (else the folder name)."""
    record = Record.from_dir(run_dir)
    if not record.data.get("config"):
        return run_dir.name
    parts = [str(record.get("pruning", "?"))]
    sparsity = record.number("sparsity")
    parts.append("?" if sparsity is None else f"{sparsity:g}")
    parts.append(f"seed{record.get('seed', '?')}")
    level = record.get("imp.level")
    if level is not None:
        parts.append(f"L{int(level):02d}")
    return "/".join(parts)


def unique(labels: Sequence[str]) -> list[str]:
    """Labels made unique with ``#2``, ``#3``, ... on repeats."""
    seen: dict[str, int] = {}
    out = []
    for text in labels:
        seen[text] = seen.get(text, 0) + 1
        out.append(text if seen[text] == 1 else f"{text}#{seen[text]}")
    return out


# -- output ----------------------------------------------------------------------------------
def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(
    runs: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    matrix: list[list[float]],
    digits: int,
    global_only: bool,
) -> str:
    """The runs, the pair comparisons and the Jaccard matrix as Markdown tables."""
    lines = [_row(["#", "run", "folder"]), _row(["---"] * 3)]
    lines += [_row([i + 1, r["label"], r["run_dir"]]) for i, r in enumerate(runs)]
    lines += ["", _row(["run A", "run B", "layer", "Jaccard", "Hamming", "Hamming %"])]
    lines.append(_row(["---", "---", "---", "---:", "---:", "---:"]))
    for pair in pairs:
        rows = [("global", pair["global"])]
        if not global_only:
            rows += list(pair["layers"].items())
        for layer, entry in rows:
            lines.append(
                _row(
                    [
                        pair["a"],
                        pair["b"],
                        layer,
                        f"{entry['jaccard']:.{digits}f}",
                        entry["hamming"],
                        f"{100 * entry['hamming_fraction']:.{max(digits - 2, 1)}f}",
                    ]
                )
            )
    names = [r["label"] for r in runs]
    lines += ["", _row(["Jaccard", *names]), _row(["---", *["---:"] * len(names)])]
    for name, values in zip(names, matrix, strict=True):
        lines.append(_row([name, *(f"{v:.{digits}f}" for v in values)]))
    return "\n".join(lines) + "\n"


def heatmap(matrix: list[list[float]], names: list[str], path: Path) -> Path:
    """The global Jaccard matrix as a PNG heat map (values written in the cells)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(names)
    size = max(4.0, 0.8 * n + 2.5)
    fig = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                value = matrix[i][j]
                colour = "black" if value > 0.6 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(image, ax=ax, label="Jaccard overlap of active weights")
    ax.set_title("Final masks: global Jaccard overlap")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# -- main ------------------------------------------------------------------------------------
def compare(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list]:
    """Load every run's masks and compare every pair: (runs, pairs, Jaccard matrix)."""
    if len(paths) < 2:
        raise CompareError("give at least two runs to compare")
    resolved = [resolve(Path(p)) for p in paths]
    masks = [load_masks(ckpt) for _, ckpt in resolved]
    names = unique([label(run_dir) for run_dir, _ in resolved])
    for name, other in zip(names[1:], masks[1:], strict=True):
        try:
            check_same_layers(masks[0], other)
        except ValueError as err:
            raise CompareError(f"{names[0]} and {name} cannot be compared: {err}") from None
    runs = [
        {"label": name, "run_dir": str(run_dir), "checkpoint": str(ckpt)}
        for name, (run_dir, ckpt) in zip(names, resolved, strict=True)
    ]
    pairs = []
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            pairs.append({"a": names[i], "b": names[j], **compare_masks(masks[i], masks[j])})
    return runs, pairs, jaccard_matrix(masks)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs, pairs, matrix = compare(args.runs)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(markdown(runs, pairs, matrix, args.digits, args.global_only), end="")
    written = heatmap(matrix, [r["label"] for r in runs], args.out)
    print(f"wrote {written}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"runs": runs, "pairs": pairs, "jaccard_matrix": matrix}, indent=2)
        )
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
