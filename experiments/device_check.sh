#!/usr/bin/env bash
# The GPU measurements of issues #4 and #5 as one command for a lent accelerator machine (see
# WORKSPACE.md, "Benchmark on a lent GPU"). Stages run in the order given, each under its own time cap,
# and write at most 8 files to $OUT (the device tool returns 8 at most):
#   env.txt  parity.txt  bench_gpu.json/.md  bench_grid_gpu.json/.md  numerics.md  log.txt
#
#   STAGES="env parity bench grid" bash experiments/device_check.sh       # on the lent machine
#   LGMREC_SMOKE=1 OUT=/tmp/dc bash experiments/device_check.sh            # here: tiny presets, CPU
#
# Stages:
#   env      nvidia-smi, python, jax devices
#   parity   both goldens at "highest" (needs the goldens in $LGMREC_SHARED, default ./.shared: copy
#            ../shared/golden there, git-ignored, and carry it; nothing of it is committed)
#   bench    clothing: segment_sum and bcoo x highest and default precision, 5 timed epochs and
#            evaluations, the persistent compilation cache cold vs warm
#   topk     clothing: evaluation top-k "direct" vs "grouped" (both exact) at default precision, appended
#            to bench_gpu (decides the default of config eval_topk on GPUs)
#   full     clothing, segment_sum, default config: one early-stopped run end to end
#   grid     configs per hour for K = 1, 4, 16 same-shape clothing configs (map, vmap_columns)
#   scale    clothing x 0.25 .. 4: epoch time and device memory against size
#   numerics the precision study: experiments/grids/numerics.py (matmul precision x feature dtype) at
#            clothing scale, seeds $SEEDS (default 0,1), full early-stopped runs; results.md (or, when
#            the cap cuts it short, the tables of the configs that finished) -> numerics.md
# One call holds at most 10 minutes and a session 15 minutes of device time: split the stages over
# two calls, e.g. STAGES="env parity bench topk full" then STAGES="grid scale numerics". The bench and
# later stages run the config defaults (eval_topk "grouped"); the topk stage times "direct" beside it.
# ml-collections is not in the machine's image: carry its wheel in .whl (device README).
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
STAGES=${STAGES:-"env parity bench topk full grid scale numerics"}
SHARED=${LGMREC_SHARED:-./.shared}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
DATA=${DATA_DIR:-/tmp/lgmrec_data}
if [ "${LGMREC_SMOKE:-0}" = 1 ]; then  # the same commands on the smallest presets, to test this script
  PRESET=tiny; SCALES=0.002,0.004; SIZES=1,2; EPOCHS=1; CAP=300; SEEDS=0,1
else
  PRESET=clothing; SCALES=0.25,0.5,1,2,4; SIZES=1,4,16; EPOCHS=5; CAP=420; SEEDS=${SEEDS:-0,1}
fi
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt"; }
stage() {  # stage NAME SECONDS COMMAND...: runs it under a cap, its output appended to log.txt
  local name=$1 cap=$2; shift 2
  log "stage $name: $*"
  local start=$SECONDS
  timeout "$cap" "$@" >>"$OUT/log.txt" 2>&1
  log "stage $name: exit $? after $((SECONDS - start)) s"
}

for s in $STAGES; do
  case $s in
    env)
      { nvidia-smi 2>&1 | head -15; $PY -c "import jax, sys; print(sys.version); print(jax.__version__, jax.devices())"; } \
        >"$OUT/env.txt" 2>&1 ;;
    parity)
      for g in lgmrec_fixed lgmrec_legacy; do
        if [ -f "$SHARED/golden/$g.npz" ]; then
          stage parity-$g 300 sh -c "$PY -m lgmrec_jax.parity --golden $SHARED/golden/$g.npz >>$OUT/parity.txt 2>&1"
        else
          log "parity: $SHARED/golden/$g.npz absent (copy ../shared/golden to $SHARED and carry it)"
        fi
      done ;;
    bench)
      stage bench "$CAP" $PY -m experiments.bench --presets=$PRESET --kernel=segment_sum,bcoo \
        --matmul_precision=highest,default --epochs_to_time=$EPOCHS --eval_repeats=$EPOCHS --compile_cache \
        --data_dir="$DATA" --out="$OUT" --tag=gpu ;;
    topk)
      stage topk "$CAP" $PY -m experiments.bench --presets=$PRESET --matmul_precision=default \
        --eval_topk=direct,grouped --epochs_to_time=1 --eval_repeats=$EPOCHS --data_dir="$DATA" --out="$OUT" \
        --tag=gpu --append ;;
    full)
      stage full "$CAP" $PY -m experiments.bench --presets=$PRESET --full_run --epochs_to_time=2 --eval_repeats=2 \
        --data_dir="$DATA" --out="$OUT" --tag=gpu --append ;;
    grid)
      stage grid "$CAP" $PY -m experiments.bench_grid --dataset=synthetic_$PRESET --sizes=$SIZES \
        --batchings=map,vmap_columns --device_counts=1 --epochs=2 --data_dir="$DATA" --out="$OUT" --tag=gpu ;;
    scale)
      stage scale "$CAP" $PY -m experiments.bench --scales=$SCALES --epochs_to_time=2 --eval_repeats=2 \
        --data_dir="$DATA" --out="$OUT" --tag=gpu --append ;;
    numerics)
      stage numerics "$CAP" $PY -m experiments.grid --grid=numerics --dataset=synthetic_$PRESET --data_dir="$DATA" \
        --seeds=$SEEDS --workdir=/tmp/lgmrec_numerics
      # Cut off by its cap, the grid has written no tables: make them from the configs that finished
      # (rerunning the stage resumes the rest).
      [ -f /tmp/lgmrec_numerics/results.md ] || $PY -m experiments.grid_merge --workdir=/tmp/lgmrec_numerics \
        --allow_partial >>"$OUT/log.txt" 2>&1
      cp /tmp/lgmrec_numerics/results.md "$OUT/numerics.md" 2>/dev/null || log "numerics: no results yet" ;;
    *) log "unknown stage $s" ;;
  esac
done
ls -la "$OUT" | tee -a "$OUT/log.txt"
