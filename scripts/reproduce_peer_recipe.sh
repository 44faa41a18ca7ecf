#!/usr/bin/env bash
# Reproduce the peer-recipe table of the README: LeNet-300-100 on Fashion-MNIST with the
# recipe the peer tools were measured on (conf/experiment/fmnist_peer_recipe.yaml).
#
#   bash scripts/reproduce_peer_recipe.sh            # everything, 2 jobs in parallel
#   N_JOBS=1 SEEDS=0 bash scripts/reproduce_peer_recipe.sh
#   SKIP_COMPLETED=any_code bash scripts/reproduce_peer_recipe.sh   # reuse runs of older code
#
# Three sweeps into outputs/multiruns/fmnist_peer_recipe*/ (re-running skips what completed):
#   1. the six methods with their own distributions at 90/95/98%, 3 seeds (20 epochs);
#   2. GMP with one global magnitude threshold (the algorithm of Lightning's ModelPruning);
#   3. RigL trained 5x longer (100 epochs) at 95/98%, the RigL paper's budget comparison;
#   4. han and dns at 90/95/98%; l0 (l0_lambda=3, gate_lr=20, gates folded at 75% of training,
#      then pruned by magnitude to the target and fine-tuned, so every cell is at its column's
#      sparsity; with SGD the gates need their own rate, and a stronger pull (l0_lambda x
#      gate_lr >= 100) closes 96-99.7% of them, past every column);
#   5. IMP (lottery tickets) with levels at 50/75/90/95/98%, rewinding to step 500 (about one
#      epoch, as Frankle et al. 2020 rewind large-learning-rate runs): one run per seed gives
#      all three columns.
# Then prints the table with the peers' numbers beside the matching cells.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N_JOBS=${N_JOBS:-2}
SEEDS=${SEEDS:-0,1,2}
export WANDB_MODE=${WANDB_MODE:-offline}
ROOT=${ROOT:-outputs/multiruns}
# Re-running skips cells that completed with the same code (any_code: with any code).
SKIP_COMPLETED=${SKIP_COMPLETED:-true}
COMMON=(experiment=fmnist_peer_recipe launcher=joblib "n_jobs=$N_JOBS" "seed=$SEEDS"
  logger.wandb.enabled=false "skip_completed=$SKIP_COMPLETED")

"$PY" train.py "${COMMON[@]}" "hydra.sweep.dir=$ROOT/fmnist_peer_recipe/methods"
"$PY" train.py "${COMMON[@]}" pruning=gmp distribution=global \
  "hydra.sweep.dir=$ROOT/fmnist_peer_recipe/gmp_global"
"$PY" train.py "${COMMON[@]}" pruning=rigl sparsity=0.95,0.98 epochs=100 \
  "hydra.sweep.dir=$ROOT/fmnist_peer_recipe/rigl_100_epochs"

"$PY" train.py "${COMMON[@]}" pruning=han,dns "hydra.sweep.dir=$ROOT/fmnist_peer_recipe/han_dns"
"$PY" train.py "${COMMON[@]}" pruning=l0 pruning.l0_lambda=3 pruning.gate_lr=20 \
  pruning.prune_to_target=true schedule=one_shot schedule.at=0.75 \
  "hydra.sweep.dir=$ROOT/fmnist_peer_recipe/l0"
"$PY" train.py "${COMMON[@]}" pruning=imp sparsity=0.98 \
  'pruning.level_sparsities=[0.5,0.75,0.9,0.95,0.98]' pruning.rewind_step=500 \
  "hydra.sweep.dir=$ROOT/fmnist_peer_recipe/imp"

# IMP's levels at 0/50/75% are left out of the table (its 90/95/98% levels are the cells).
"$PY" scripts/make_table.py "$ROOT/fmnist_peer_recipe" --rows pruning,distribution,epochs \
  --published fmnist_peer_recipe --where sparsity=0,0.9,0.95,0.98 --where 'imp.level!=0'
