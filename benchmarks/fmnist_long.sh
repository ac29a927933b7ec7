#!/usr/bin/env bash
# Fashion-MNIST on a longer schedule (issue 25): 20,000 training images, 8 epochs (2,504 steps of 64, 6.3x the short
# table's 395), GBLR's phase 1 the first 5; the Mixer cells the short schedule left open. GBLR, the equal-init
# low-rank and Monarch, and dense at GBLR's init, one file per run (so that a stopped sweep keeps what finished):
#
#   bash benchmarks/fmnist_long.sh mixer 0.5 "0 1 2 3 4"      # 5-9 min per run on one thread (two side by side)
#   bash benchmarks/fmnist_long.sh mixer 0.3 "0 1 2" nodense  # the dense runs of the first call serve both budgets
#   bash benchmarks/fmnist_long.sh mixer 0.5 "5 6 7" vsmonarch  # more seeds of GBLR and the best baseline only
#   python benchmarks/accuracy_fmnist.py --paired-only --reference 'gblr[long20k]' \
#       --report docs/fmnist/long20k_*_mixer50_s*.json
#
# Run two calls side by side on 2 cores (one thread each), or split the seeds between them. A dense run twice as
# long (16 epochs) says how far the 8-epoch schedule is from converged:
#
#   bash benchmarks/fmnist_long.sh mixer 0.5 "0" dense16
#
# Low-rank at the per-layer FLOPs the GBLR run of the same seed learned (1.1x, so that rounding its rank down does
# not leave it below GBLR): the learned allocation without the learned structure.
#
#   bash benchmarks/fmnist_long.sh mixer 0.5 "0 1 2 3 4" lralloc
#
# GBLR with every layer held to the budget on its own (BudgetRule(allocation="layer")): the learned structure
# without the learned allocation (files long20k_gblrlayer_*, structures in docs/fmnist/structures_long20k_layer).
#
#   bash benchmarks/fmnist_long.sh mixer 0.3 "0 1 2 3 4" layeralloc
#   bash benchmarks/fmnist_long.sh mixer 0.3 "5 6 7 8 9" layeralloc; bash benchmarks/fmnist_long.sh mixer 0.3 "5 6 7 8 9" monarch
#
# At 10 % the fixed structures' rounded-down rank or block count leaves them below GBLR's FLOPs; "up" trains them at
# 1.1x the budget (at or above GBLR's FLOPs, as the short table's 10 % rows do) beside GBLR (files long20k_*up_*):
#
#   bash benchmarks/fmnist_long.sh mixer 0.1 "0 1 2 3 4" up; bash benchmarks/fmnist_long.sh mixer 0.1 "0 1 2 3 4" layeralloc
#
# GBLR with a structure phase of 2 epochs instead of 5 (the same 8 epochs in all; files long20k_gblrp1e2_*):
#
#   bash benchmarks/fmnist_long.sh vit 0.5 "0 1 2 3 4" p1e2
#
# GBLR started from a block-low-rank layout (location_init="tiled": a b x b grid of windows of width 1/b, Monarch's
# block structure up to a row permutation) instead of evenly spaced full windows; WIDTH is 1/b (files
# long20k_gblrtiled_*, structures in docs/fmnist/structures_long20k_tiled):
#
#   bash benchmarks/fmnist_long.sh vit 0.5 "0 1 2 3 4" tiled 0.3333
#
# The same start with the windows held in their tiles: the locations' learning rate 100x smaller (2.5e-5) and the
# width step unchanged (width_lr_scale 400 instead of 4), so the learner chooses each tile's widths and the
# allocation, not where the blocks go (files long20k_gblrtiledfix_*, structures in ..._tiledfix):
#
#   bash benchmarks/fmnist_long.sh vit 0.5 "0 1 2 3 4" tiledfix 0.3333
#
# The same with sharp masks from the first step (sigma 100 throughout instead of annealed from 1), so the layers
# are block-low-rank from the start as Monarch is (files long20k_gblrtiledsharp_*):
#
#   bash benchmarks/fmnist_long.sh vit 0.5 "0 1 2 3 4" tiledsharp 0.3333
#
# The tiled start with every layer held to the budget on its own (BudgetRule(allocation="layer")): Monarch's uniform
# allocation, with the structure within each layer learned (files long20k_gblrtiledlayer_*):
#
#   bash benchmarks/fmnist_long.sh vit 0.5 "0 1 2 3 4" tiledlayer 0.3333
# GBLR with components of rank 2 instead of 1 (half as many components, the same parameters; files long20k_gblrrank2_*,
# structures in docs/fmnist/structures_long20k_rank2):
#
#   bash benchmarks/fmnist_long.sh vit 0.5 "0 1 2 3 4" rank2
set -euo pipefail
cd "$(dirname "$0")/.."
m=${1:?usage: fmnist_long.sh vit|mixer BUDGET "SEEDS" [nodense|vsmonarch|dense16|lralloc|layeralloc|monarch|up|p1e2|rank2|tiled WIDTH|tiledfix WIDTH|tiledsharp WIDTH|tiledlayer WIDTH]}
b=${2:?budget, e.g. 0.5}
seeds=${3:?seeds, e.g. "0 1 2"}
mode=${4:-}
width=${5:-}
tag="${m}$(python -c "print(round(100 * $b))")"
common=(--models "$m" --train-subset 20000 --epochs 8 --phase1-epochs 5 --batch-size 64 --threads 1 --no-report)
run() { OMP_NUM_THREADS=1 python benchmarks/accuracy_fmnist.py "${common[@]}" "$@"; }
for s in $seeds; do
  if [ "$mode" = dense16 ]; then
    run --methods dense --budgets "$b" --seeds "$s" --epochs 16 --dense-init fan_in --label "long20k,16 epochs,init=fan_in" \
      --json "docs/fmnist/long20k_dense_${m}_ep16_s$s.json"
    continue
  fi
  if [ "$mode" = lralloc ]; then
    run --methods lowrank --budgets "$b" --seeds "$s" --baseline-allocation docs/fmnist/structures_long20k \
      --baseline-budget-scale 1.1 --label "long20k,equal-init,gblr-allocation" --json "docs/fmnist/long20k_lralloc_${tag}_s$s.json"
    continue
  fi
  if [ "$mode" = layeralloc ]; then
    run --methods gblr --budgets "$b" --seeds "$s" --label "long20k,layer-alloc" \
      --gblr 'rule={"class_path":"gsm_lightning.learn.rules.BudgetRule","init_args":{"allocation":"layer"}}' \
      --structures docs/fmnist/structures_long20k_layer --json "docs/fmnist/long20k_gblrlayer_${tag}_s$s.json"
    continue
  fi
  if [ "$mode" = p1e2 ]; then
    run --methods gblr --budgets "$b" --seeds "$s" --phase1-epochs 2 --label "long20k,phase1=2" \
      --structures docs/fmnist/structures_long20k_p1e2 --json "docs/fmnist/long20k_gblrp1e2_${tag}_s$s.json"
    continue
  fi
  if [ "$mode" = rank2 ]; then
    run --methods gblr --budgets "$b" --seeds "$s" --gblr 'layer_kwargs={"rank_per_component":2}' --label "long20k,rank 2" \
      --structures docs/fmnist/structures_long20k_rank2 --json "docs/fmnist/long20k_gblrrank2_${tag}_s$s.json"
    continue
  fi
  if [[ "$mode" == tiled* ]]; then  # tiled, tiledfix, tiledsharp, tiledlayer
    label="long20k,tiled=${width:?$mode needs WIDTH}"; extra=()
    hold='rule={"class_path":"gsm_lightning.learn.rules.BudgetRule","init_args":{"structure_lr":2.5e-5,"width_lr_scale":400}}'
    case "$mode" in
      tiledfix) extra=(--gblr "$hold"); label+=",locations fixed" ;;
      tiledsharp) extra=(--gblr "$hold" sigma0=100); label+=",locations fixed,sigma 100" ;;
      tiledlayer) extra=(--gblr 'rule={"class_path":"gsm_lightning.learn.rules.BudgetRule","init_args":{"allocation":"layer"}}')
                  label+=",layer-alloc" ;;
    esac
    run --methods gblr --budgets "$b" --seeds "$s" --gblr-location-init tiled --gblr-width-init "$width" "${extra[@]}" \
      --label "$label" --structures "docs/fmnist/structures_long20k_$mode" --json "docs/fmnist/long20k_gblr${mode}_${tag}_s$s.json"
    continue
  fi
  if [ "$mode" = monarch ]; then
    run --methods monarch --budgets "$b" --seeds "$s" --label "long20k,equal-init" --json "docs/fmnist/long20k_monarch_${tag}_s$s.json"
    continue
  fi
  run --methods gblr --budgets "$b" --seeds "$s" --label long20k --structures docs/fmnist/structures_long20k \
    --json "docs/fmnist/long20k_gblr_${tag}_s$s.json"
  fixed="monarch lowrank"; [ "$mode" = vsmonarch ] && fixed=monarch
  scale=(); label="long20k,equal-init"; up=""
  [ "$mode" = up ] && { scale=(--baseline-budget-scale 1.1); label="long20k,equal-init,flops>=gblr"; up=up; }
  for f in $fixed; do
    run --methods "$f" --budgets "$b" --seeds "$s" "${scale[@]}" --label "$label" --json "docs/fmnist/long20k_${f}${up}_${tag}_s$s.json"
  done
  if [ -z "$mode" ]; then
    run --methods dense --budgets "$b" --seeds "$s" --dense-init fan_in --label "long20k,init=fan_in" \
      --json "docs/fmnist/long20k_dense_${tag}_s$s.json"
  fi
done
