#!/usr/bin/env bash
# One benchmark run of a baseline checkout and this one, interleaved (ABAB), on the same machine:
# a single run's steady epoch and evaluation (experiments.bench, synthetic_baby and the default preset)
# and a group's (experiments.bench_grid, default preset, K = 4, map).
#
#   experiments/bench_before_after.sh BASELINE_CHECKOUT OUT_DIR [PYTHON]
#
# Each checkout runs its own scripts; results go to OUT_DIR/{before,after}_<round>/ as the scripts
# write them, and OUT_DIR/summary.md holds the medians side by side.
set -euo pipefail
before=$(cd "$1" && pwd)
out=$(mkdir -p "$2" && cd "$2" && pwd)
python=${3:-python}
after=$(cd "$(dirname "$0")/.." && pwd)
data="$out/data"
for round in 1 2; do
  for side in before after; do
    tree=${!side}
    dir="$out/${side}_${round}"
    mkdir -p "$dir"
    echo "== round $round: $side ($tree)" >&2
    (cd "$tree" && "$python" -m experiments.bench --presets=baby,default --data_dir="$data" --out="$dir" \
       --tag=cpu --epochs_to_time=3 --eval_repeats=3 >"$dir/bench.log" 2>&1)
    (cd "$tree" && "$python" -m experiments.bench_grid --dataset=synthetic --data_dir="$data" --sizes=4 \
       --batchings=map --device_counts=1 --epochs=2 --out="$dir" --tag=cpu >"$dir/bench_grid.log" 2>&1)
  done
done
"$python" - "$out" <<'EOF'
import json, os, statistics, sys

out = sys.argv[1]
lines = ["| measurement | before (median of 2 rounds) | after (median of 2 rounds) |", "|---|---|---|"]
def load(side, name):
    return [json.load(open(os.path.join(out, f"{side}_{r}", name))) for r in (1, 2)]
def single(result):
    return {(c["dataset"], k): c[k] for c in result["results"] for k in ("epoch_s", "eval_s") if k in c}
def group(result):
    found = {("single run (bench_grid)", k): result["single"][k] for k in ("train_epoch_s", "eval_s")}
    found.update({(f"group K={g['k']} {g['batching']}", k): g[k] for g in result["groups"]
                  for k in ("train_epoch_s", "eval_s") if k in g})
    return found
for name, extract in (("bench_cpu.json", single), ("bench_grid_cpu.json", group)):
    sides = {s: [extract(r) for r in load(s, name)] for s in ("before", "after")}
    for key in sorted(sides["after"][0]):
        vals = {s: statistics.median(r[key] for r in rs if key in r) for s, rs in sides.items()}
        lines.append(f"| {key[0]} {key[1]} | {vals['before']:.4f} s | {vals['after']:.4f} s |")
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
