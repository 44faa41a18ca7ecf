#!/usr/bin/env bash
# Reproduce the input-adaptive pruning table of the README: Conv-4 on Fashion-MNIST with
# Feature Boosting and Suppression (pruning=fbs, top-k gating), its threshold-gated variant
# and static structured pruning (structured_l1), several densities each, at about equal mean
# MACs per input (fbs at density d keeps ~d^2 of a middle layer's MACs, so structured_l1 runs at
# sparsity 1 - d^2), plus the dense model. Writes the table and the accuracy-vs-MACs plot.
#
#   bash scripts/reproduce_fbs.sh                 # Conv-4, seed 0 (~8 min on 2 cores)
#   MODEL=resnet20 bash scripts/reproduce_fbs.sh  # ResNet-20 (~7 min)
#   SEEDS=0,1,2 bash scripts/reproduce_fbs.sh
#   EPOCHS=20 LIMIT=null bash scripts/reproduce_fbs.sh   # the full recipe (hours on a CPU)
#
# Reduced budget by default, to fit a 2-core CPU: EPOCHS=2 epochs of LIMIT=0.1 of the training
# set each and validation on VAL_LIMIT=2 batches (structured_l1 prunes at the end of the first
# epoch and fine-tunes in the second); the test split is whole. One job at a time: the runs
# measure latency. Re-running skips the runs that completed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0}
EPOCHS=${EPOCHS:-2}
LIMIT=${LIMIT:-0.1}
VAL_LIMIT=${VAL_LIMIT:-2}
MODEL=${MODEL:-conv4}
export WANDB_MODE=${WANDB_MODE:-offline}
ROOT=${ROOT:-outputs/multiruns/fmnist_fbs}
COMMON=(dataset=fashion_mnist "model=$MODEL" "epochs=$EPOCHS" "trainer.limit_train_batches=$LIMIT"
  "trainer.limit_val_batches=$VAL_LIMIT" "seed=$SEEDS" "cost.latency_batch_sizes=[1]"
  skip_completed=true)

"$PY" train.py -m "${COMMON[@]}" pruning=dense "hydra.sweep.dir=$ROOT/$MODEL/dense"
"$PY" train.py -m "${COMMON[@]}" pruning=fbs sparsity=0.25,0.5,0.75 \
  "hydra.sweep.dir=$ROOT/$MODEL/fbs"
"$PY" train.py -m "${COMMON[@]}" pruning=fbs pruning.gating=threshold sparsity=0.25,0.5,0.75 \
  "hydra.sweep.dir=$ROOT/$MODEL/fbs_threshold"
"$PY" train.py -m "${COMMON[@]}" pruning=structured_l1 sparsity=0.4375,0.75,0.9375 \
  "hydra.sweep.dir=$ROOT/$MODEL/structured"

# Batch-1 latency timed again from the checkpoints, dense and pruned in alternating rounds on
# the same test inputs, one thread (drop --threads on a quiet machine).
"$PY" scripts/fbs_table.py "$ROOT/$MODEL" --retime --threads 1 --out "$ROOT/$MODEL/table.md" \
  --plot "$ROOT/$MODEL/accuracy_vs_macs.png"
