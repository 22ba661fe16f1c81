#!/usr/bin/env bash
# Out-of-sample check of a controller setting on the validation hold-out, five folds:
# for each fold I, a disagreement profile from the other four folds (`--part 5fIc`) and an offline
# replay of the drifting stream drawn from fold I (`--split val-5fI`). Then one table.
#
#   benchmarks/controller_folds.sh TAG [--control KEY=VALUE ...]
#
# Profiles land in runs/profile-4bit-val-5fIc.json (made once), replays in runs/folds/TAG-5fI/.
# The base settings are the README's chosen profile setting; --control adds to or overrides them.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:?usage: benchmarks/controller_folds.sh TAG [--control KEY=VALUE ...]}
shift
py=${PYTHON:-python}
bundle=models/cifar10-hybrid-resnet20-4bit
data=${DATA_ROOT:-../shared/datasets/cifar10}
for i in 0 1 2 3 4; do
  profile=runs/profile-4bit-val-5f${i}c.json
  [ -f "$profile" ] || $py -m edgecloud.cli control profile $bundle --data-root "$data" --part 5f${i}c --out "$profile"
  out=runs/folds/$tag-5f$i
  $py benchmarks/controller.py --split val-5f$i --data-root "$data" --scale 2 --control-window 4000 \
    --control shadow_target=0 --control shadow_min=0.003 --control estimator=profile \
    --control meet_window=1000 --control profile_band=250 --control profile="$profile" \
    "$@" --modes offline --out "$out" > /dev/null
done
$py benchmarks/controller_summaries.py runs/folds/$tag-5f*/
