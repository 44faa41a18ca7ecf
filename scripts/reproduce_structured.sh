#!/usr/bin/env bash
# Reproduce the structured-pruning table of the README: LeNet-300-100 and ResNet-20 on
# Fashion-MNIST (conf/experiment/fmnist_structured.yaml): accuracy, parameters, MACs, file
# size and measured CPU latency of the dense model, 90% unstructured (gmp), and each
# structured method at equal parameter count, with the compacted model's figures beside.
#
#   bash scripts/reproduce_structured.sh               # both models, seed 0 (~30 min, 2 cores)
#   SEEDS=0,1,2 bash scripts/reproduce_structured.sh
#   MODELS=lenet bash scripts/reproduce_structured.sh  # LeNet-300-100 only (~5 min)
#
# One job at a time: the runs measure latency, and parallel jobs would share the cores.
# ResNet-20 trains 2 epochs of a quarter of the training set each (trainer.
# limit_train_batches=0.25, half a pass over the data in all; pruning at the end of the first)
# and leaves the latency to the table's re-timing, to fit a 2-core CPU; with a GPU, drop those
# overrides and raise epochs. Re-running skips the runs that completed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0}
MODELS=${MODELS:-lenet,resnet20}
export WANDB_MODE=${WANDB_MODE:-offline}
ROOT=${ROOT:-outputs/multiruns/fmnist_structured}
COMMON=(experiment=fmnist_structured "seed=$SEEDS")
STRUCTURED=structured_l1,neuron_sensitivity,taylor

if [[ $MODELS == *lenet* ]]; then
  "$PY" train.py "${COMMON[@]}" model=lenet300_100 pruning=dense,gmp sparsity=0.9 \
    "hydra.sweep.dir=$ROOT/lenet300_100/unstructured"
  "$PY" train.py "${COMMON[@]}" model=lenet300_100 "pruning=$STRUCTURED" sparsity=0.5,0.9 \
    "hydra.sweep.dir=$ROOT/lenet300_100/structured"
fi
if [[ $MODELS == *resnet20* ]]; then
  R20=(model=resnet20 epochs=2 trainer.limit_train_batches=0.25 cost.latency=false)
  "$PY" train.py "${COMMON[@]}" "${R20[@]}" pruning=dense,gmp sparsity=0.9 \
    "hydra.sweep.dir=$ROOT/resnet20/unstructured"
  "$PY" train.py "${COMMON[@]}" "${R20[@]}" "pruning=$STRUCTURED,block" sparsity=0.5 \
    "hydra.sweep.dir=$ROOT/resnet20/structured"
fi

# Latency timed again from the checkpoints, dense and compacted in alternating rounds, one
# thread (the sweep shares the cores with whatever else runs; drop --threads on a quiet machine).
"$PY" scripts/structured_table.py "$ROOT" --retime --threads 1 --out "$ROOT/table.md"
