#!/usr/bin/env bash
# The GPU measurements of issues #4 and #5 as one command for a lent accelerator machine (see
# WORKSPACE.md, "Benchmark on a lent GPU"). Stages run in the order given, each under its own time cap
# and, with DEADLINE=<seconds>, inside one overall budget (a stage that would start with under 30 s
# left is skipped and logged). At most 8 files come back from $OUT (the device tool's limit):
#   env.txt  parity.txt  bench_gpu.json  torch_proxy_gpu.json  numerics.md/.csv  log.txt  (grid: bench_grid_gpu.*)
#
#   DEADLINE=560 bash experiments/device_check.sh                        # on the lent machine
#   LGMREC_SMOKE=1 LGMREC_SHARED=../shared OUT=/tmp/dc bash experiments/device_check.sh   # here: tiny, CPU
#
# Stages (default order = priority order):
#   env       nvidia-smi, python, jax devices, the versions of flax, optax, orbax, ml_collections
#   preflight a tiny training run through the CLI (data, training, evaluation, orbax checkpoints). If it
#             fails with the image's packages, the wheels in .whl/fallback (the versions CI tests: flax,
#             optax, orbax-checkpoint) are put first on PYTHONPATH and it is tried once more.
#   parity    both goldens at "highest" with the default kernel, and lgmrec_fixed with kernel "ell"
#             ($PARITY_RUNS: GOLDEN:KERNEL[:PRECISION] words, precision "highest" unless named, e.g.
#             lgmrec_fixed:segment_sum:TF32_TF32_F32_X3; about 45 s each on an H100) (needs the goldens in $LGMREC_SHARED, default ./.shared: copy ../shared/golden there,
#             git-ignored, and carry it; nothing of it is committed)
#   profile   clothing, highest precision, kernels segment_sum and ell ($PROFILE_ARGS: other bench flags):
#             epoch and evaluation times, and where the device time goes by operation and by model scope
#             (--trace: JAX profiler traces summed by experiments/trace_summary.py), appended to bench_gpu
#   compile   clothing, highest: compile time and epoch time under XLA flags that trade autotuning for
#             compile time, one configuration per word of $COMPILE_FLAGS (default
#             "--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false": each flag alone), added
#             to the image's XLA_FLAGS; compare with the profile/bench rows without them
#             ($COMPILE_ARGS=--compile_only: the compile alone, without timing epochs)
#   phases    clothing, highest, compile only: XLA's own phase timers (TF_CPP_VMODULE=$PHASE_MODULES at
#             level 1), summed by experiments/compile_phases.py for the epoch program into log.txt
#             (where the ~25-35 s of the first compile go; the raw log stays in /tmp/lgmrec_phases.log)
#   breakdown clothing, highest, with XLA's command buffers (CUDA graphs) off: a trace of one epoch in
#             which each kernel is its own event, so that the device time splits by operation and by
#             model scope (with them on, a step's ~190 kernels are all named after one command buffer)
#   bench     clothing, segment_sum, highest and default precision: 5 timed epochs and evaluations, and
#             the persistent compilation cache cold vs warm
#   full      clothing, the default config: one early-stopped run end to end (after 1 timed epoch)
#   torchref  experiments/torch_proxy.py on the GPU (the image's PyTorch): SPEC.md's model run the
#             reference's way, at clothing scale, 2 timed epochs and evaluations -> torch_proxy_gpu.json
#             (the .md is made again from it where the files land: torch_proxy.markdown)
#   numerics  the precision study: experiments/grids/numerics.py at clothing scale, seeds $SEEDS
#             (default 0,1), full early-stopped runs, shard $NUMERICS_SHARD of the grid (default 0/1,
#             all; 0/2 is the float32 half, 1/2 the bfloat16 half); results.md (or, when the cap cuts
#             it short, the tables of the configs that finished) -> numerics.md
#   scale     clothing x $SCALES (default 0.5,2; x1 is bench's): epoch time and device memory vs size
#   variants  appended to bench_gpu: the bcoo kernel, the "direct" top-k (beside the default
#             "grouped"), bf16 features at default precision (all three measured on an H100 once:
#             experiments/results/bench_gpu.md)
#   ablation  clothing, highest: the epoch broken down by timing ablations (--profile; each variant
#             is its own program, so this stage spends most of its time compiling)
#   grid      configs per hour for K = 1, 4, 16 same-shape clothing configs (map, vmap_columns)
# The synthetic datasets are generated in the background from the start, while env, preflight and
# parity use the GPU. ml-collections is not in the machine's image: carry its wheel in .whl (device
# README); rerunning a stage on a warm machine reuses /tmp/lgmrec_data and resumes the numerics grid.
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
STAGES=${STAGES:-"env preflight parity profile breakdown compile phases full torchref numerics bench scale variants ablation grid"}
SHARED=${LGMREC_SHARED:-./.shared}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-0}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
DATA=${DATA_DIR:-/tmp/lgmrec_data}
if [ "${LGMREC_SMOKE:-0}" = 1 ]; then  # the same commands on the smallest presets, to test this script
  PRESET=tiny; SCALES=${SCALES:-0.002,0.004}; SIZES=1,2; EPOCHS=1; CAP=300; SEEDS=${SEEDS:-0,1}; TORCH_DEVICE=cpu
else
  PRESET=clothing; SCALES=${SCALES:-0.5,2}; SIZES=1,4,16; EPOCHS=5; CAP=420; SEEDS=${SEEDS:-0,1}; TORCH_DEVICE=cuda
fi
NUMERICS_SHARD=${NUMERICS_SHARD:-0/1}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt"; }
left() { if [ "$DEADLINE" -gt 0 ]; then echo $((DEADLINE - SECONDS)); else echo 100000; fi; }
stage() {  # stage NAME SECONDS COMMAND...: runs it under min(cap, time left), output appended to log.txt
  local name=$1 cap=$2; shift 2
  local rest; rest=$(left)
  if [ "$rest" -lt 30 ]; then log "stage $name: skipped, ${rest} s left of DEADLINE=$DEADLINE"; return 1; fi
  [ "$rest" -lt "$cap" ] && cap=$rest
  log "stage $name (cap $cap s): $*"
  local start=$SECONDS
  timeout -k 10 "$cap" "$@" >>"$OUT/log.txt" 2>&1  # -k: a process that ignores SIGTERM is killed
  local rc=$?
  log "stage $name: exit $rc after $((SECONDS - start)) s"
  return $rc
}
# The committed GPU results are the start of this call's: bench's --append adds its runs to them, so
# the bench_gpu.json that comes back holds every earlier run too (each names its device and versions).
[ -f experiments/results/bench_gpu.json ] && [ ! -f "$OUT/bench_gpu.json" ] && [ "${LGMREC_SMOKE:-0}" != 1 ] \
  && cp experiments/results/bench_gpu.json "$OUT/bench_gpu.json"
BENCH="$PY -m experiments.bench --data_dir=$DATA --out=$OUT --tag=gpu"  # word-split on purpose: no spaces

# The preset's dataset, generated on the CPUs while the first stages use the GPU; the generator's Gumbel
# draws run on all but 4 of the CPUs, which those stages' compiles keep. The scale stage's benchmark
# generates the scaled ones itself, on every CPU, so that no generator competes with the compiles that
# the stages between time (x2 took 3 minutes here when the draws ran on one thread, and 52 s on the
# threads of this project's 2-core CPU).
JAX_PLATFORMS=cpu $PY - "$DATA" "synthetic_$PRESET" >>"$OUT/log.txt" 2>&1 <<'PYEOF' &
import os, sys, time
if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 8:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:-4])
from experiments.bench import load
tick = time.perf_counter()
load(sys.argv[2], sys.argv[1])
print(f"generated/loaded {sys.argv[2]} in {time.perf_counter() - tick:.1f} s", flush=True)
PYEOF
GEN=$!
datasets_ready() { wait "$GEN" 2>/dev/null; }

for s in $STAGES; do
  case $s in
    env)
      { nvidia-smi 2>&1 | head -15; $PY -c "
import sys, jax, flax, optax, orbax.checkpoint as ocp, ml_collections
print(sys.version); print('jax', jax.__version__, jax.devices())
print('flax', flax.__version__, 'optax', optax.__version__, 'orbax', ocp.__version__)"; } >"$OUT/env.txt" 2>&1 ;;
    preflight)
      tiny="$PY -m lgmrec_jax.train --dataset=synthetic_tiny --data_dir=$DATA --workdir=/tmp/lgmrec_preflight --restart"
      if ! stage preflight 120 $tiny && [ -d .whl/fallback ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_fallback \
          .whl/fallback/*.whl && export PYTHONPATH="/tmp/site_fallback:$PYTHONPATH"
        log "preflight: retrying with .whl/fallback first on PYTHONPATH"
        stage preflight-fallback 120 $tiny
        $PY -c "import flax, optax, orbax.checkpoint as o; print('now: flax', flax.__version__, 'optax', \
optax.__version__, 'orbax', o.__version__)" >>"$OUT/env.txt" 2>&1
      fi ;;
    parity)
      for run in ${PARITY_RUNS:-lgmrec_fixed:segment_sum lgmrec_legacy:segment_sum lgmrec_fixed:ell}; do
        g=${run%%:*} rest=${run#*:}
        kernel=${rest%%:*} precision=highest
        [ "$rest" != "$kernel" ] && precision=${rest#*:}
        if [ -f "$SHARED/golden/$g.npz" ]; then
          echo "== $g, kernel $kernel, matmul precision $precision" >>"$OUT/parity.txt"
          stage parity-$g-$kernel-$precision 150 sh -c "$PY -m lgmrec_jax.parity --golden $SHARED/golden/$g.npz \
            --kernel=$kernel --matmul_precision=$precision >>$OUT/parity.txt 2>&1"
        else
          log "parity: $SHARED/golden/$g.npz absent (copy ../shared/golden to $SHARED and carry it)"
        fi
      done ;;
    profile)
      datasets_ready
      stage profile "$CAP" $BENCH --presets=$PRESET ${PROFILE_ARGS:---kernel=segment_sum,ell --matmul_precision=highest} \
        --trace --epochs_to_time=3 --eval_repeats=3 --append ;;
    compile)
      datasets_ready
      for f in ${COMPILE_FLAGS:---xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false}; do
        stage "compile$f" 150 env XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$f" $BENCH --presets=$PRESET --matmul_precision=highest \
          ${COMPILE_ARGS:---epochs_to_time=2 --eval_repeats=2} --append
      done ;;
    phases)
      datasets_ready
      modules=${PHASE_MODULES:-gpu_compiler=1,nvptx_compiler=1,compile_module_to_llvm_ir=1,gemm_fusion_autotuner=1,autotuner_util=1,autotuner_compile_util=1,triton_fusion_emitter=1,cpu_compiler=1}
      stage phases 150 sh -c "TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=$modules $BENCH --presets=$PRESET \
        --matmul_precision=highest --compile_only --isolate=false --out=/tmp/lgmrec_phases --append 2>/tmp/lgmrec_phases.log"
      $PY -m experiments.compile_phases /tmp/lgmrec_phases.log --program=jit_run_epoch >>"$OUT/log.txt" 2>&1 ;;
    breakdown)
      datasets_ready
      stage breakdown 150 env XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=" $BENCH \
        --presets=$PRESET --matmul_precision=highest --trace --epochs_to_time=2 --eval_repeats=1 --append ;;
    ablation)
      datasets_ready
      stage ablation "$CAP" $BENCH --presets=$PRESET --matmul_precision=highest --profile --epochs_to_time=1 \
        --eval_repeats=1 --append ;;
    bench)
      datasets_ready
      stage bench "$CAP" $BENCH --presets=$PRESET --kernel=segment_sum --matmul_precision=highest,default \
        --epochs_to_time=$EPOCHS --eval_repeats=$EPOCHS --compile_cache --append ;;
    full)
      datasets_ready
      stage full "$CAP" $BENCH --presets=$PRESET --full_run --epochs_to_time=1 --eval_repeats=1 --append ;;
    torchref)
      datasets_ready
      stage torchref 180 $PY -m experiments.torch_proxy --device=$TORCH_DEVICE --datasets=synthetic_$PRESET \
        --data_dir="$DATA" --epochs_to_time=2 --eval_repeats=2 --out="$OUT" --tag=gpu
      rm -f "$OUT/torch_proxy_gpu.md" ;;
    numerics)
      datasets_ready
      rest=$(left)
      stage numerics $(( rest > 60 ? (rest - 20 < CAP ? rest - 20 : CAP) : 30 )) $PY -m experiments.grid \
        --grid=numerics --dataset=synthetic_$PRESET --data_dir="$DATA" --seeds=$SEEDS --grid_shard=$NUMERICS_SHARD \
        --workdir=/tmp/lgmrec_numerics
      # Cut off by its cap, the grid has written no tables: make them from the configs that finished
      # (rerunning the stage resumes the rest).
      tables=/tmp/lgmrec_numerics
      [ "$NUMERICS_SHARD" != 0/1 ] && tables=/tmp/lgmrec_numerics/shards/${NUMERICS_SHARD/\//-of-}
      if [ ! -f $tables/results.md ]; then
        tables=/tmp/lgmrec_numerics
        timeout -k 5 60 $PY -m experiments.grid_merge --workdir=$tables --allow_partial >>"$OUT/log.txt" 2>&1
      fi
      cp $tables/results.md "$OUT/numerics.md" 2>/dev/null || log "numerics: no results yet"
      cp $tables/results.csv "$OUT/numerics.csv" 2>/dev/null ;;
    variants)
      datasets_ready
      stage variant-bcoo 150 $BENCH --presets=$PRESET --kernel=bcoo --matmul_precision=highest \
        --epochs_to_time=3 --eval_repeats=1 --append
      stage variant-direct-topk 150 $BENCH --presets=$PRESET --eval_topk=direct --matmul_precision=highest \
        --epochs_to_time=1 --eval_repeats=$EPOCHS --append
      stage variant-bf16 150 $BENCH --presets=$PRESET --feature_dtype=bfloat16 --matmul_precision=default \
        --epochs_to_time=3 --eval_repeats=3 --append ;;
    scale)
      datasets_ready
      stage scale "$CAP" $BENCH --scales=$SCALES --epochs_to_time=2 --eval_repeats=2 --append ;;
    grid)
      stage grid "$CAP" $PY -m experiments.bench_grid --dataset=synthetic_$PRESET --sizes=$SIZES \
        --batchings=map,vmap_columns --device_counts=1 --epochs=2 --data_dir="$DATA" --out="$OUT" --tag=gpu ;;
    *) log "unknown stage $s" ;;
  esac
done
kill "$GEN" 2>/dev/null  # a dataset no stage got to
# bench_gpu.md is made again from bench_gpu.json where the files land (experiments.bench.markdown), so
# that numerics.csv fits under the device tool's 8 returned files.
rm -f "$OUT/bench_gpu.md"
ls -la "$OUT" | tee -a "$OUT/log.txt"
