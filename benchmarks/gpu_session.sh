#!/usr/bin/env bash
# One GPU call: set up the carried packages, then run the named steps, each under its own time limit, logging
# under $OUT. Steps: gputests[:<timeout>], pytest:<file>[,<file>...][:<timeout>[:<-k expression>]], gemm:<policies>:<budget>,
# scaling:<units>:<base>, farm:<policy>:<budget> (MiniGPT twice from an empty table), run:<model>:<policy>:<budget>
# (into the same table), bench:<model>:<policy>[:<bench options, '+' for spaces>], profile:<model>:<policy> (one more
# `fact-ray run` under cProfile: where a run served from the table spends its time), attn:<dtype> (attention alone,
# MiniGPT's shape and Llama-3-8B's grouped-query attention, every FMHA tile
# against every SDPA backend: benchmarks/attention.py, libraries from benchmarks/build/attn-<dtype> when carried),
# normbw:<dtype>[:<timeout>] (issue 16: benchmarks/norm_bw.py, norm and RoPE kernels' bandwidth against a copy, eager
# and torch.compile at Llama-3-8B's and MiniGPT's sizes),
# swiglu:<dtype>[:<budget>] (issue 16: SwiGLU's first half alone against two cuBLAS GEMMs + silu * up,
# benchmarks/swiglu.py; libraries from benchmarks/build/swiglu-<dtype> when carried),
# suite:<policy>:<budget>[:<timeout>[:<models>]] (issue 15: benchmarks/suite.py over benchmarks/models/ or the comma list
# of stems and paths given, resumable on a warm machine, FR_* sizes from the env),
# e2e:<model>:<policy>[:<budget>[:<variants>]] (issue 18: `fact-ray run` then `fact-ray bench` with every variant, or the comma
# list given, composed+compile, composed+max-autotune and composed+cudagraphs included; JSON, PNG and table under bench/), methods (the five
# timing methods side by side on a Llama-style block: benchmarks/bench_methods.py), fleet:<gpu counts, '+'
# between>[:<timeout>] (issue 13: benchmarks/fleet_scaling.py, a fleet's cold night on 1 vs N GPUs and a night with
# nothing changed; resumable: a call cut off by the 10-minute limit is continued by the same step in the next call
# on the same machine, the nights timed so far kept under .fact-ray/fleet-work/), budget:<policy>:<problems, '+'
# between, empty for all>:<max budget> (issue 17: benchmarks/budget_curve.py; sweeps accumulate in
# .fact-ray/budget/ across calls on the same machine, the build cache too), ablation (benchmarks/rank_ablation.py
# over those sweeps)
#   bash benchmarks/gpu_session.sh gputests gemm:bf16,tf32:6
#   bash benchmarks/gpu_session.sh farm:fp32:8 bench:examples/minigpt.py:fp32
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1 || { echo "pip -e failed"; exit 1; }
# Logs go to a staging folder that is packed into $OUT/session.tgz after every step: the device returns only a
# handful of files per call, and a call cut off by its time limit still returns the steps it finished.
FINAL=${OUT:-/tmp/out}; OUT=$(mktemp -d); mkdir -p "$FINAL"
# The carried site-packages arrive as sources only (make-site unpacks them fresh on every machine) and this image
# does not keep the bytecode Python writes: byte-compile them once, as `pip install` does at install time, so that
# no step pays for compiling mlflow's or Ray's modules again in every process (5.8 s of a 14.6 s profiled run).
python3 -m compileall -q -j 0 /tmp/site fact_ray actors pattern_table search_spaces >/dev/null 2>&1 || true
pack() { tar -C "$OUT" -czf "$FINAL/session.tgz.part" . && mv "$FINAL/session.tgz.part" "$FINAL/session.tgz"; }
date=$(date -u +%Y-%m-%d)
for step in "$@"; do
  IFS=: read -r name a b c <<<"$step"
  echo "=== $step ($(date -u +%T))"
  case "$name" in
    pytest) timeout "${b:-400}" python3 -m pytest -q -m gpu ${a//,/ } ${c:+-k "$c"} -rfEs --durations=8 -p no:cacheprovider 2>&1 \
              | tee "$OUT/pytest-$(basename "${a%%,*}" .py).log" | tail -40 ;;
    # cpu-tests:<file>[,<file>...][:<timeout>]: files' tests without the gpu marker, under the image's own torch
    # (CPU tests of code that leans on torch internals: FX code generation, pytree specs, export's graphs)
    cpu-tests) timeout "${b:-300}" python3 -m pytest -q ${a//,/ } -rfEs -p no:cacheprovider 2>&1 \
                 | tee "$OUT/cpu-tests-$(basename "${a%%,*}" .py).log" | tail -30 ;;
    # gputests[:<timeout>[:<workers>]]: -v so that every test's outcome is in the log as it finishes (a call cut off
    # by its time limit keeps them); workers > 1 spread the test files over pytest-xdist processes sharing the GPU
    gputests) timeout "${a:-300}" python3 -m pytest -v -m gpu tests --durations=15 -rfEs -p no:cacheprovider \
                ${b:+-n "$b" --dist loadfile} 2>&1 | tee "$OUT/gputests.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" | tail -70 ;;
    gemm) timeout "${c:-420}" python3 benchmarks/gemm.py --policy "$a" --budget "$b" --out "$OUT/gemm-${a//,/-}.jsonl" 2>&1 \
            | tee "$OUT/gemm-${a//,/-}.log" | tail -40 ;;
    scaling) timeout 400 python3 benchmarks/compile_scaling.py --units "$a" --base-units "${b:-0}" --arch sm80 --out "$OUT/compile-scaling.json" 2>&1 \
            | tee "$OUT/scaling.log" | tail -15 ;;
    farm) rm -rf .fact-ray/pattern_table .fact-ray/mlflow.db
          for i in 1 2; do
            /usr/bin/time -f "run $i wall %e s" timeout 400 fact-ray run examples/minigpt.py --policy "$a" ${b:+--budget "$b"} 2>&1 \
              | tee "$OUT/farm-$a-run$i.log" | tail -25
          done
          fact-ray table list 2>&1 | tee "$OUT/farm-table.log" | tail -12
          fact-ray compare --last 2 2>&1 | tee "$OUT/farm-compare.log" | tail -12 ;;
    run) m=$(basename "$a" .py)
         /usr/bin/time -f "run wall %e s" timeout 400 fact-ray run "$a" --policy "$b" --budget "${c:-8}" 2>&1 \
           | tee "$OUT/run-$m-$b.log" | tail -25 ;;
    bench) m=$(basename "$a" .py)
           timeout 500 fact-ray bench "$a" --policy "$b" --out "$OUT/bench" ${c:+${c//+/ }} 2>&1 \
             | tee "$OUT/bench-$m-$b${c:+-${c//[^a-z0-9]/}}.log" | tail -25 ;;
    profile) m=$(basename "$a" .py)
             /usr/bin/time -f "profiled run wall %e s" timeout 200 python3 -m cProfile -o "$OUT/profile-$m-$b.prof" \
               "$(command -v fact-ray)" run "$a" --policy "$b" 2>&1 | tee "$OUT/profile-$m-$b.log" | tail -4
             python3 -c "import pstats,sys; pstats.Stats(sys.argv[1]).sort_stats('cumulative').print_stats(45)" \
               "$OUT/profile-$m-$b.prof" > "$OUT/profile-$m-$b.txt" 2>&1 ;;
    e2e) m=$(basename "$a" .py)  # issue 18: run (table-served when warm) then bench with every variant (or those given)
         IFS=: read -r bud vars <<<"${c:-}"
         /usr/bin/time -f "run wall %e s" timeout 300 fact-ray run "$a" --policy "$b" --budget "${bud:-8}" 2>&1 \
           | tee "$OUT/run-$m-$b.log" | tail -20
         timeout 420 fact-ray bench "$a" --policy "$b" --out "$OUT/bench" --reps 30 --calls 20 ${vars:+--variants "$vars"} 2>&1 \
           | tee "$OUT/bench-$m-$b.log" | tail -25 ;;
    attn) timeout 560 python3 benchmarks/attention.py --dtype "$a" --prebuilt "benchmarks/build/attn-$a" \
            --out "$OUT/attention-$a.json" 2>&1 | tee "$OUT/attention-$a.log" | tail -12 ;;
    swiglu) timeout 400 python3 benchmarks/swiglu.py --dtype "${a:-bfloat16}" --budget "${b:-4}" \
              --prebuilt "benchmarks/build/swiglu-${a:-bfloat16}" --out "$OUT/swiglu-${a:-bfloat16}.json" 2>&1 \
              | tee "$OUT/swiglu-${a:-bfloat16}.log" | tail -12 ;;  # issue 16: SwiGLU's first half alone
    suite) IFS=: read -r t models <<<"${c:-}"  # issue 15: every model of benchmarks/models/ (or the comma list given)
           # the suite's folder lives in the tree so that the same step in a later call on a warm machine goes on
           # with the models not done yet (benchmarks/suite.py keeps a ledger); a copy goes back every call
           work=".fact-ray/suite-${a:-bf16}"
           timeout "${t:-560}" python3 benchmarks/suite.py --policy "${a:-bf16}" --budget "${b:-8}" --out "$work" \
             ${models:+--models "$models"} 2>&1 | tee -a "$OUT/suite-${a:-bf16}.log" | grep -v '^|' | tail -30
           tail -16 "$work/suite-${a:-bf16}.md" 2>/dev/null; rm -rf "$OUT/suite-${a:-bf16}"; cp -r "$work" "$OUT/suite-${a:-bf16}" ;;
    normbw) timeout "${b:-500}" python3 benchmarks/norm_bw.py --dtype "${a:-bfloat16}" --out "$OUT/norm-bw-${a:-bfloat16}.json" 2>&1 \
              | tee "$OUT/norm-bw-${a:-bfloat16}.log" | tail -60 ;;
    methods) timeout 400 python3 benchmarks/bench_methods.py --out "$OUT/bench-methods.json" 2>&1 \
               | tee "$OUT/bench-methods.log" | tail -15 ;;
    fleet) timeout "${b:-580}" python3 benchmarks/fleet_scaling.py ${a:+--gpus "${a//+/,}"} --out "$OUT/fleet-scaling.json" \
             --keep .fact-ray/fleet-work 2>&1 | tee "$OUT/fleet-scaling.log" | tail -20 ;;
    budget) timeout 580 python3 benchmarks/budget_curve.py --policy "${a:-bf16}" ${b:+--only "${b//+/,}"} \
              --max-budget "${c:-64}" --out .fact-ray/budget 2>&1 | tee "$OUT/budget-${a:-bf16}.log" | tail -20
            mkdir -p "$OUT/budget" && cp .fact-ray/budget/budget_curve.* "$OUT/budget/" 2>/dev/null ;;
    ablation) timeout 300 python3 benchmarks/rank_ablation.py --sweeps .fact-ray/budget/budget_curve.json \
                --out "$OUT/budget" 2>&1 | tee "$OUT/rank-ablation.log" | tail -20 ;;
    # py:<script>[:<timeout>]: any script of the tree, its stdout logged (a diagnosis that is not a benchmark yet)
    py) timeout "${b:-400}" python3 "$a" --out "$OUT/$(basename "$a" .py).json" 2>&1 | tee "$OUT/$(basename "$a" .py).log" | tail -60 ;;
    *) echo "unknown step $step" ;;
  esac
  pack
done
pack
