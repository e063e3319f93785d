#!/usr/bin/env bash
# The GPU checks a session with a GPU owes, in one command: the `gpu` tests (every kernel compiled
# for real, SD shapes, fp16/bf16/fp32), then the benchmarks whose results get committed under
# bench/results/. Each stage writes under OUTDIR and a failing stage does not stop the next.
#
#   bash bench/gpu_checks.sh OUTDIR                    # all stages
#   bash bench/gpu_checks.sh OUTDIR tests ops          # some: gluon tests ops tune unet pipelines repaint250 tune-bwd split pytest-bench
#
# `gluon` runs first: the Gluon sm_90 attention research backend (kernels/attention_sm90.py), never
# yet run on a GPU, gets its `gpu` tests in a process of its own (a fault there poisons the CUDA
# context, so the `tests` stage leaves that file out), then, if they pass, its op timings next to
# the Triton kernel and every SDPA backend at the attention shapes SD 1.5 and 2.1 call, then a sweep
# of its configurations (key block, K/V buffers, where the K/V copy is issued) at D 40, then the
# SD 1.5 UNet step with it as the fallback chain gluon_sm90/triton (D 160 is over its limit) and the
# other ops on triton, next to all-triton and all-reference.
#
# `pytest-bench` (not in the default list, never yet run on a GPU, time unknown: give it a call of
# its own) runs the op, UNet-step and pipeline cases under pytest-benchmark (bench/test_bench_*.py),
# pipelines at 20 steps, without the torch.compile rows (minutes each to compile).
#
# `split` (not in the default list) tries the 40 = 32 + 16 attention head split, which crashed an
# H100 with Triton 3.6 before the alignment hint; a crash poisons the CUDA context, so it runs in
# processes of its own and the `tests` stage leaves it out.
#
# Give each stage its own call where device time is metered per call. On an H100 (2026-11-23):
# tests ~75 s with 6 xdist workers (~3x that in one process, as here) when `-m gpu` selected 126
# tests; the stage now selects 915 (since 2026-11-24 each kernel test taking `device` has a cuda case),
# time unknown: give it a call of its own, tune ~40 s per pair of shapes (~35
# configurations each, compiled once), unet ~90 s, pipelines ~220 s, repaint250 ~470 s (2410 UNet
# calls per RePaint run, hence --repeats 1). tune's cases: SD 1.5's at 512 px and SD 2.1's
# attention (D 64, 9216 tokens); at those over <= 128 keys, 16 more candidates, the K/V-resident
# forward's (never yet timed, so the stage's time with them is unknown). pipelines also runs the
# UNet-step suite for its variants, so it names the kernel settings only; the unet stage has the
# baselines (compile: minutes; ~90 s was before triton@compile, a second compile of the UNet, whose
# time is not yet measured; so is tests/test_compile.py's one sd15 compile in the tests stage).
# tune-bwd sweeps the attention backward (36 candidates per shape, one kernel varied at a time) at
# the three self-attention levels, level 0 also at batch 1 (`self0*`: a full case name alone selects
# only that case): ~140 s on an H100; its D 80 / 160 rows are host-noisy there. split sweeps the D 40
# level-0 cases: self-attention at batch 2 and 1, and cross-attention.
# The diffusers+SDPA UNet baseline needs diffusers importable; without it that row is "skipped".
# PYTHON names the interpreter (default: python), e.g. PYTHON=.venv/bin/python. A copied tree (its
# .git absent or stale) names its commit for the results in SDLAB_GIT_COMMIT (git rev-parse HEAD here).
set -uo pipefail
out=${1:?usage: bash bench/gpu_checks.sh OUTDIR [gluon|tests|ops|tune|unet|pipelines|repaint250|tune-bwd|split|pytest-bench ...]}
shift
py=${PYTHON:-python}
stages=${*:-gluon tests ops tune unet pipelines repaint250 tune-bwd}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$py" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" \
  | tee "$out/device.txt" || exit 1
status=0
for stage in $stages; do
  echo "== $stage"
  case $stage in
    gluon) "$py" -m pytest -q -m gpu tests/test_attention_sm90.py -p no:cacheprovider 2>&1 | tee "$out/gluon-tests.log" \
             && "$py" -m bench ops --ops attention --plugin kernels.attention_sm90 --shapes unet15.attn \
                  unet15@768.attn.self0 sd21 --backends reference triton sdpa-flash sdpa-cudnn sdpa-efficient gluon_sm90 \
                  --no-progress --out "$out/ops-gluon" > "$out/ops-gluon.log" 2>&1 \
             && "$py" -m bench tune --ops attention.gluon_sm90 --shapes unet15.attn.self0 unet15.attn.cross0 \
                  --dtypes fp16 --no-progress --out "$out/tune-gluon" > "$out/tune-gluon.log" 2>&1 \
             && "$py" -m bench pipelines --preset sd15 --unet-only --plugin kernels.attention_sm90 --variants \
                  reference triton attention=gluon_sm90/triton+group_norm_silu=triton+scheduler_step=triton \
                  --no-progress --out "$out/unet-gluon" > "$out/unet-gluon.log" 2>&1 ;;
    tests) "$py" -m pytest -q -m gpu -k "not masked_tail_split" --ignore tests/test_attention_sm90.py -p no:cacheprovider \
             2>&1 | tee "$out/gpu-tests.log" ;;
    split) "$py" -m pytest -q -m gpu -k masked_tail_split -p no:cacheprovider 2>&1 | tee "$out/split-tests.log" \
             && "$py" -m bench tune --ops attention --shapes 'unet15.attn.self0*' unet15.attn.cross0 --masked-tail \
                  --no-progress --out "$out/tune-split" > "$out/tune-split.log" 2>&1 ;;
    ops) "$py" -m bench ops --no-progress --out "$out/ops" > "$out/ops.log" 2>&1 ;;
    tune) "$py" -m bench tune --ops attention group_norm_silu --shapes unet15. sd21.attn. --no-progress \
            --out "$out/tune" > "$out/tune.log" 2>&1 ;;
    tune-bwd) "$py" -m bench tune --ops attention.backward --shapes 'unet15.attn.self0*' unet15.attn.self1 \
                unet15.attn.self2 --no-progress --out "$out/tune-bwd" > "$out/tune-bwd.log" 2>&1 ;;
    unet) "$py" -m bench pipelines --preset sd15 --unet-only --breakdown --no-progress --out "$out/unet" \
            > "$out/unet.log" 2>&1 ;;
    pipelines) "$py" -m bench pipelines --preset sd15 --steps 20 --variants reference triton triton:group_norm_silu \
                 triton:attention triton:scheduler_step --no-progress --out "$out/pipelines" > "$out/pipelines.log" 2>&1 ;;
    repaint250) "$py" -m bench pipelines --preset sd15 --steps 250 --repeats 1 --pipelines repaint unet9 blend \
                  --variants reference triton --no-progress --out "$out/repaint250" > "$out/repaint250.log" 2>&1 ;;
    pytest-bench) "$py" -m pytest -q -p no:cacheprovider bench/ --benchmark-only --sd-steps 20 \
                    -k "not compile" --benchmark-json "$out/pytest-bench.json" > "$out/pytest-bench.log" 2>&1 ;;
    *) echo "unknown stage '$stage'; stages: gluon tests ops tune unet pipelines repaint250 tune-bwd split pytest-bench" >&2
       exit 2 ;;
  esac
  rc=$?
  echo "== $stage: exit $rc"
  [ "$rc" = 0 ] || status=1
done
exit $status
