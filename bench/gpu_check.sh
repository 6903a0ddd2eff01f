#!/usr/bin/env bash
# The GPU check: one command on a fresh GPU machine, from the repository root.
#
#   bash bench/gpu_check.sh [WHEELS] [OUT]     # defaults: .whl, runs/gpu-check (or $OUT/gpu-check)
#
# 1. Installs the wheels in WHEELS (bench/gpu_wheels.sh fetches them: kvikio, DeepSpeed and what
#    a stock CUDA + PyTorch image lacks) into a private folder, without any download; no folder:
#    nothing installed, what is missing is skipped and said so.
# 2. Runs the CUDA tests (pytest -m gpu): GPU parity against in-memory training, fp32 and bf16
#    mixed precision, NVMe tiers through kvikio and posix, HOST tiers, swapped activations,
#    accumulation, clipping, the CUDA-event timeline.
# 3. Runs the GPU benchmark (python -m bench run --suite gpu): offload-train against in-memory
#    PyTorch and ZeRO-Infinity on a 704M-parameter model whose fp32 weights are 4x the GPU memory
#    budget: TFLOPS, GPU busy (CUDA events), bytes per link, the cost model's prediction.
# 4. Writes OUT/gpu-check.md (the machine, the test summary, the benchmark report) and beside
#    it gpu-tests.log, bench.log, results.json and trace.json (five files; swap files and the
#    rest of the benchmark's folder stay in $TMPDIR).
#   GPU_CHECK_SUITE=tiny GPU_CHECK_ALLOW_CPU=1: try the script itself on a machine without a GPU
#   (the CUDA tests then run on the CPU, OFFLOAD_TRAIN_TEST_DEVICE=cpu; the tiny suite).
# Fits one lent session: each part has its own time limit (installs 60 s, tests 150 s,
# benchmark 270 s), under 8 minutes in all. Exit status: 0 when the tests passed and the
# benchmark wrote its report, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
DEST=${2:-${OUT:-runs}/gpu-check}
PY=${PYTHON:-python3}
WORK=${TMPDIR:-/tmp}/offload-train-gpu-check
mkdir -p "$DEST" "$WORK"
REPORT=$DEST/gpu-check.md
export PYTHONUNBUFFERED=1
status=0

note() { echo "$*" | tee -a "$REPORT"; }
: > "$REPORT"
note "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
note ""

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=${TMPDIR:-/tmp}/offload-train-site
  if timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$SITE" "$WHEELS"/*.whl; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    note "- wheels installed from $WHEELS: $(cd "$WHEELS" && ls -1 ./*.whl | sed 's|^\./||; s|-[0-9].*||' | tr '\n' ' ')"
  else
    note "- the wheels in $WHEELS did not install: going on with what the machine has"
  fi
else
  note "- no wheels in $WHEELS (bash bench/gpu_wheels.sh fetches them): going on with what the machine has"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if ! "$PY" - >>"$REPORT" 2>&1 <<'EOF'
import importlib.util
import os
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__} (CUDA {torch.version.cuda})")
elif os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
    print(f"- no CUDA device: the script tried on the CPU (GPU_CHECK_ALLOW_CPU=1), torch {torch.__version__}")
else:
    raise SystemExit("- no CUDA device visible to torch: nothing to check here")
for name in ("kvikio", "deepspeed", "transformers", "peft"):
    spec = importlib.util.find_spec(name)
    print(f"- {name}: {'present' if spec else 'missing'}")
EOF
then
  tail -1 "$REPORT"
  exit 1
fi
note ""

[ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
  && export OFFLOAD_TRAIN_TEST_DEVICE=cpu
SUITE=${GPU_CHECK_SUITE:-gpu}

note "## CUDA tests (pytest -m gpu)"
note ""
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests 2>&1 | tee "$DEST/gpu-tests.log" | tail -40
rc=${PIPESTATUS[0]}
{ echo '```'; tail -25 "$DEST/gpu-tests.log"; echo '```'; echo; } >> "$REPORT"
[ "$rc" = 0 ] || { note "CUDA tests: exit status $rc"; status=1; }

note "## Benchmark (python -m bench run --suite $SUITE)"
note ""
rm -rf "$WORK/report"
timeout 270 "$PY" -m bench run --suite "$SUITE" --path "$WORK" --out "$WORK/report" --no-plots 2>&1 \
  | tee "$DEST/bench.log" | grep -v "Warning\|warn(" | tail -20
rc=${PIPESTATUS[0]}
if [ -f "$WORK/report/report.md" ]; then
  cat "$WORK/report/report.md" >> "$REPORT"
  cp "$WORK/report/results.json" "$DEST/" 2>/dev/null
  cp "$WORK/report/trace.json" "$DEST/" 2>/dev/null
else
  { echo "no report (exit status $rc); the end of the log:"; echo '```'; tail -30 "$DEST/bench.log"; echo '```'; } >> "$REPORT"
  status=1
fi
[ "$rc" = 0 ] || note "benchmark: exit status $rc (an engine that failed is named in the notes)"
rm -rf "$WORK"  # swap files, fio's file
echo "GPU check written to $REPORT"
exit $status
