#!/usr/bin/env bash
# Out-of-sample check of a controller setting on the validation hold-out, five folds:
# for each fold I, a disagreement profile from the other four folds (`--part 5fIc`) and an offline
# replay of the drifting stream drawn from fold I (`--split val-5fI`); then the in-sample row, the
# whole hold-out's stream against the shipped profile (`--split val`). Then one table.
#
#   benchmarks/controller_folds.sh TAG [--control KEY=VALUE ...]
#
# Profiles land in runs/profile-4bit-val-5fIc.json (made once), replays in runs/folds/TAG-5fI/
# and runs/folds/TAG-val/; each stream's offline reference is computed once and kept in
# runs/fold-references/5fI/ (val/).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:?usage: benchmarks/controller_folds.sh TAG [--control KEY=VALUE ...]}
shift
py=${PYTHON:-python}
bundle=models/cifar10-hybrid-resnet20-4bit
data=${DATA_ROOT:-../shared/datasets/cifar10}
for part in 5f0 5f1 5f2 5f3 5f4 val; do
  if [ "$part" = val ]; then
    profile=docs/control/profile-4bit-val.json
    split=val
  else
    profile=runs/profile-4bit-val-${part}c.json
    split=val-$part
    [ -f "$profile" ] || $py -m edgecloud.cli control profile $bundle --data-root "$data" \
      --part ${part}c --out "$profile"
  fi
  out=runs/folds/$tag-$part
  ref=runs/fold-references/$part
  mkdir -p "$out" "$ref"
  if [ -f "$ref/reference.key" ]; then cp "$ref"/reference.npz "$ref"/reference.key "$out"/; fi
  $py benchmarks/controller.py --split $split --data-root "$data" --scale 2 --control-window 4000 \
    --control shadow_target=0 --control shadow_min=0.003 --control estimator=profile \
    --control meet_window=1000 --control profile_band=250 --control profile="$profile" \
    "$@" --modes offline --out "$out" > /dev/null
  if [ ! -f "$ref/reference.key" ]; then cp "$out"/reference.npz "$out"/reference.key "$ref"/; fi
done
$py benchmarks/controller_summaries.py runs/folds/$tag-5f? runs/folds/$tag-val
