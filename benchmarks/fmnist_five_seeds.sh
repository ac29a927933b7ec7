#!/usr/bin/env bash
# Fashion-MNIST with 5 seeds at 10, 30 and 50 % FLOPs (issue 25): GBLR, the equal-init low-rank and Monarch,
# dense at both inits. Extends the 3-seed files of docs/fmnist/ (seeds 0-2 at 30/50 %) with seeds 3-4 and the
# 10 % cell (seeds 0-4). One model per call, one thread; run the two models side by side on 2 cores:
#
#   bash benchmarks/fmnist_five_seeds.sh vit & bash benchmarks/fmnist_five_seeds.sh mixer; wait
#   python benchmarks/accuracy_fmnist.py --report docs/fmnist/{base,gblr,equal_init,abl_dense_fan_in,five_*}_{vit,mixer}.json
#
# About 35 min per model on one core (5,000 images, 5 epochs, phase 1 of 3), plus 10 min for the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
m=${1:?usage: fmnist_five_seeds.sh vit|mixer}
common=(--models "$m" --train-subset 5000 --epochs 5 --phase1-epochs 3 --batch-size 64 --threads 1 --no-report)
run() { OMP_NUM_THREADS=1 python benchmarks/accuracy_fmnist.py "${common[@]}" "$@"; }
run --methods gblr --budgets 0.1 --seeds 0,1,2,3,4 --structures docs/fmnist/structures --json "docs/fmnist/five_gblr10_$m.json"
run --methods lowrank,monarch --budgets 0.1 --seeds 0,1,2,3,4 --label equal-init --json "docs/fmnist/five_eq10_$m.json"
run --methods gblr --budgets 0.3,0.5 --seeds 3,4 --structures docs/fmnist/structures --json "docs/fmnist/five_gblr_$m.json"
run --methods lowrank,monarch --budgets 0.3,0.5 --seeds 3,4 --label equal-init --json "docs/fmnist/five_eq_$m.json"
run --methods dense --seeds 3,4 --dense-init fan_in --label init=fan_in --json "docs/fmnist/five_densefan_$m.json"
run --methods dense --seeds 3,4 --json "docs/fmnist/five_dense_$m.json"
# The fixed structures round their rank down (10 %: FLOPs ratio 0.089-0.092 against GBLR's 0.100). The same runs
# at 1.1x the budget put them at 0.100-0.107, at or above GBLR:
run --methods lowrank,monarch --budgets 0.1 --seeds 0,1,2,3,4 --baseline-budget-scale 1.1 --label "equal-init,flops>=gblr" --json "docs/fmnist/five_eq10up_$m.json"
# Low-rank at the per-layer FLOPs GBLR learned (same model, budget, seed; 1.1x so that rounding down does not leave
# it below GBLR): the learned allocation without the learned structure.
run --methods lowrank --budgets 0.1,0.3,0.5 --seeds 0,1,2,3,4 --baseline-allocation docs/fmnist/structures --baseline-budget-scale 1.1 --label "equal-init,gblr-allocation" --json "docs/fmnist/five_lralloc_$m.json"
