#!/usr/bin/env bash
# The evidence for adaptive per-layer rates, in three parts (PARTS=table,adaptive,tasks):
#
# table     Layer-sensitivity allocation against ERK and uniform on the peer recipe
#           (conf/experiment/fmnist_sensitivity.yaml: LeNet-300-100 on Fashion-MNIST, all 60k
#           training images, SGD 0.1 cosine, weight decay 5e-4, batch 128, 20 epochs):
#           1. a dense run of the recipe with 10% of the training images held out
#              (dataset.val_fraction=0.1, seed 0);
#           2. its layer-sensitivity curves (scripts/sensitivity.py --split val), measured on
#              that held-out split, so the allocation never sees the test set;
#           3. gmp and rigl at 95/98%, seeds 0-2, with distribution=sensitivity (those
#              curves), erk and uniform: 36 runs of the full recipe (no validation split);
#           4. the table: rows pruning,distribution, columns sparsity, test accuracy
#              mean ± std over seeds (also written to <ROOT>/table.md).
# adaptive  pruning=adaptive on Fashion-MNIST / LeNet-300-100 with the defaults (Adam 1e-3,
#           20 dense epochs, 10% validation split, 6 candidates of 1 fine-tuning epoch):
#           max_accuracy_drop=0.01; the same with max_macs=MAX_MACS (default 26620, 10% of
#           the dense model's 266,200 MACs); max_macs alone. Then every chosen point is
#           reloaded and measured again on the validation split against the dense stage.
# tasks     The same model pruned by pruning=adaptive max_accuracy_drop=0.01
#           distribution=sensitivity on two tasks (TASKS, default fashion_mnist and mnist1d),
#           each with curves measured on its own validation split from a dense run of the same
#           configuration and seed (the search's dense stage is that same model), then
#           scripts/plot_task_adaptation.py draws and tabulates the per-layer rates
#           (<TROOT>/task_adaptation.png and .md).
#
#   bash scripts/reproduce_sensitivity.sh                 # everything (~13 min on 2 cores)
#   PARTS=table SEEDS=0 bash scripts/reproduce_sensitivity.sh
#   OUT=outputs/smoke EPOCHS=1 SEEDS=0 EXTRA="trainer.limit_train_batches=5" \
#     bash scripts/reproduce_sensitivity.sh               # a quick end-to-end check
#
# Re-running skips what completed (sweeps: skip_completed; single runs: their results.json;
# an adaptive run resumes its search in its folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N_JOBS=${N_JOBS:-2}
SEEDS=${SEEDS:-0,1,2}
PARTS=${PARTS:-table,adaptive,tasks}
OUT=${OUT:-outputs}
ROOT=${ROOT:-$OUT/multiruns/fmnist_sensitivity}
AROOT=${AROOT:-$OUT/runs/adaptive_fmnist}
TROOT=${TROOT:-$OUT/runs/task_adaptation}
TASKS=${TASKS:-fashion_mnist,mnist1d}
MAX_MACS=${MAX_MACS:-26620}
# Grid of the sensitivity curves (scripts/sensitivity.py's default).
GRID=${GRID:-0.5 0.7 0.8 0.9 0.95 0.98 0.99}
# Re-running skips cells that completed with the same code (any_code: with any code).
SKIP_COMPLETED=${SKIP_COMPLETED:-true}
export WANDB_MODE=${WANDB_MODE:-offline}
# Extra overrides for every training run, e.g. EPOCHS=1 EXTRA="trainer.limit_train_batches=5".
read -r -a EXTRA_ARGS <<<"${EXTRA:-}"
EPOCH_ARGS=()
if [[ -n ${EPOCHS:-} ]]; then EPOCH_ARGS=("epochs=$EPOCHS"); fi
QUIET=(logger.wandb.enabled=false "${EPOCH_ARGS[@]}" "${EXTRA_ARGS[@]}")
read -r -a GRID_ARGS <<<"$GRID"

completed() { # completed RUN_DIR: its results.json says completed
  "$PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("status") != "completed")' \
    "$1/results.json" 2>/dev/null
}

took() { # took LABEL START: print the wall time since START (seconds)
  echo "== $1: $((SECONDS - $2)) s"
}

curves() { # curves RUN_DIR: layer-sensitivity curves on the run's validation split
  "$PY" scripts/sensitivity.py "$1" --split val --no-wandb --sparsities "${GRID_ARGS[@]}" |
    grep -v '^wrote '
}

if [[ $PARTS == *table* ]]; then
  start=$SECONDS
  DENSE=$ROOT/dense_val/0
  "$PY" train.py experiment=fmnist_sensitivity pruning=dense sparsity=0 seed=0 \
    dataset.val_fraction=0.1 "${QUIET[@]}" "skip_completed=$SKIP_COMPLETED" \
    "hydra.sweep.dir=$ROOT/dense_val"
  curves "$DENSE"
  COMMON=(experiment=fmnist_sensitivity launcher=joblib "n_jobs=$N_JOBS" "seed=$SEEDS"
    "${QUIET[@]}" "skip_completed=$SKIP_COMPLETED")
  "$PY" train.py "${COMMON[@]}" distribution=sensitivity "distribution.curves=$DENSE" \
    "hydra.sweep.dir=$ROOT/sensitivity"
  "$PY" train.py "${COMMON[@]}" distribution=erk,uniform "hydra.sweep.dir=$ROOT/erk_uniform"
  "$PY" scripts/make_table.py "$ROOT/sensitivity" "$ROOT/erk_uniform" \
    --rows pruning,distribution --cols sparsity --out "$ROOT/table.md"
  took table "$start"
fi

if [[ $PARTS == *adaptive* ]]; then
  FMNIST=(dataset=fashion_mnist model=lenet300_100 "${QUIET[@]}")
  for budget in "accuracy:max_accuracy_drop=0.01" \
    "accuracy_macs:max_accuracy_drop=0.01 max_macs=$MAX_MACS" "macs:max_macs=$MAX_MACS"; do
    name=${budget%%:*}
    read -r -a overrides <<<"${budget#*:}"
    start=$SECONDS
    # Exit status 2 (no point within the budget) is a result here, not a failure.
    "$PY" train.py pruning=adaptive "${overrides[@]}" "${FMNIST[@]}" \
      "hydra.run.dir=$AROOT/$name" || echo "== adaptive $name: exit status $?"
    took "adaptive $name" "$start"
  done
  # Every chosen point, reloaded and measured again on the validation split.
  "$PY" - "$AROOT"/*/ <<'EOF'
import json
import sys
from pathlib import Path

sys.path.insert(0, "src")
import torch  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from prunelab.train import build  # noqa: E402


def val_acc(run_dir: str) -> tuple[float, float]:
    """Validation accuracy of a stage's last checkpoint (its weights, into a model built
    from its config) and the fraction of its prunable weights that are zero."""
    record = json.loads((Path(run_dir) / "results.json").read_text())
    config = {**record["config"], "pruning": {"name": "dense"}}
    built = build(OmegaConf.create(config))
    ckpt = torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model, data = built["model"], built["datamodule"]
    model.load_state_dict(state)
    model.eval()
    data.setup("fit")
    correct = total = 0
    with torch.no_grad():
        for x, y in data.val_dataloader():
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += int(y.numel())
    zeros = sum(int((p == 0).sum()) for p in built["prunable"].values())
    return correct / total, zeros / sum(p.numel() for p in built["prunable"].values())


for run in sys.argv[1:]:
    record = json.loads((Path(run) / "results.json").read_text())
    summary = record.get("adaptive") or {}
    chosen, budget = summary.get("chosen"), summary.get("budget") or {}
    print(f"{Path(run).name}: budget {budget}, stopped: {summary.get('reason')}")
    if not chosen:
        print(f"  no point within the budget; closest: {summary.get('closest')}")
        continue
    dense = next(s["run_dir"] for s in record["sub_runs"] if s["stage"] == "dense")
    dense_acc, _ = val_acc(dense)
    acc, sparsity = val_acc(chosen["run_dir"])
    drop, limit = dense_acc - acc, budget.get("max_accuracy_drop")
    macs, max_macs = chosen.get("macs"), budget.get("max_macs")
    ok = (limit is None or drop <= limit + 1e-12) and (max_macs is None or macs <= max_macs)
    print(
        f"  chosen {chosen['sparsity']:g} (weights zero {sparsity:.4f}): val acc {100 * acc:.2f} vs "
        f"dense {100 * dense_acc:.2f}, drop {100 * drop:+.2f} points, {macs:,.0f} MACs: "
        f"{'within' if ok else 'OUTSIDE'} the budget"
    )
EOF
fi

if [[ $PARTS == *tasks* ]]; then
  start=$SECONDS
  IFS=, read -r -a tasks <<<"$TASKS"
  runs=()
  for task in "${tasks[@]}"; do
    SAME=(dataset="$task" model=lenet300_100 seed=0 "${QUIET[@]}")
    if ! completed "$TROOT/$task/dense"; then
      "$PY" train.py pruning=dense "${SAME[@]}" "hydra.run.dir=$TROOT/$task/dense"
    fi
    curves "$TROOT/$task/dense"
    "$PY" train.py pruning=adaptive max_accuracy_drop=0.01 distribution=sensitivity \
      "distribution.curves=$TROOT/$task/dense" "${SAME[@]}" \
      "hydra.run.dir=$TROOT/$task/adaptive" || echo "== adaptive $task: exit status $?"
    runs+=("$TROOT/$task/adaptive")
  done
  "$PY" scripts/plot_task_adaptation.py "${runs[@]}" --at 0.9 --out "$TROOT/task_adaptation.png"
  took tasks "$start"
fi
