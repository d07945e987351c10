#!/usr/bin/env bash
# Every check that needs a GPU, as one command for a lent device (the `device` tool gives a
# session 15 minutes in all, start-up included, so this is prepared and tested here first).
#
#   here, once:  bash benchmarks/gpu_session.sh --fetch-wheels     # peers' wheels into .whl/ (ignored)
#   device:      run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=590)
#
# On the device (its image has torch, triton, onnx, onnxruntime, click, rich; nothing can be
# downloaded there) it installs attnc offline without dependencies plus the carried peer wheels
# (flash-linear-attention, fla-core, lightning-attn; NATTEN ships only a source distribution
# that needs a long CUDA build, so its peer is skipped), then
#   1. tests/plugins/test_kernels.py's interpreter sweep (every op, dtype, odd size and the
#      TensorRT entry points) compiled and run on the GPU against float64;
#   2. the agent route table (fused TensorRT kernel vs two SDPA calls per shape class, three
#      dtypes), then benchmarks/bench_kernels.py in fp16, then bf16 and fp32 as time allows:
#      every kernel against its peers at realistic sizes, with its error against float64;
#   3. the gpu-marked tests (TensorRT engines run only where TensorRT imports).
# Raw results and the log land in $OUT (at most 8 files come back); copy them into
# benchmarks/results/ and summarise them in benchmarks/RESULTS.md; copy agent-routes.json to
# plugins/agent/routes.json (the measured agent routes attnc compile then follows).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec python3 -m pip download --no-deps --only-binary=:all: -d .whl \
        flash-linear-attention==0.6.0 fla-core==0.6.0 lightning-attn==0.0.5
fi

OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu-session.log"
PY=python3
step() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    2>&1 | tee -a "$LOG"

step "install (offline)"
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
        && export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 \
    || { step "attnc did not install: see $LOG"; exit 1; }

step "kernel correctness on hardware (the interpreter sweep's cases, compiled; one process per op)"
# ~70 cases, each its own JIT compile (1-3 s on one core): the four ops compile side by side.
OPS="neighborhood linear flow agent"
for op in $OPS; do
    (cd tests/plugins && ATTNC_KERNEL_DEVICE=cuda timeout 100 $PY test_kernels.py gpu "$op") \
        > "$OUT/kernels-gpu-$op.jsonl" 2>> "$LOG" &
done
wait
for op in $OPS; do cat "$OUT/kernels-gpu-$op.jsonl"; rm -f "$OUT/kernels-gpu-$op.jsonl"; done \
    > "$OUT/kernels-gpu-sweep.jsonl"
$PY - "$OUT/kernels-gpu-sweep.jsonl" <<'SUMMARY' 2>&1 | tee -a "$LOG"
import collections, json, sys
sys.path.insert(0, "tests/plugins")
from test_kernels import CASES   # what each op should have run (a timeout leaves some out)
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
bad = [r for r in rows if "exception" in r or max(r["errors"]) > r["tol"]]
ran = collections.Counter(r["op"] for r in rows)
print(f"{len(rows)} of {sum(map(len, CASES.values()))} cases ran, {len(rows) - len(bad)} within tolerance "
      "(fp32 1e-4, fp16/bf16 1e-2 of max |ref|); per op: "
      + ", ".join(f"{op} {ran[op]}/{len(cases)}" for op, cases in CASES.items()))
for r in bad:
    print("  FAIL", r["op"], r["case"], r.get("exception") or r["errors"], "seed", r["seed"])
SUMMARY

ROUTES="$OUT/agent-routes.json"   # -> plugins/agent/routes.json (attnc compile's agent routes)
for dtype in fp16 bf16 fp32; do   # the route pair only (no torch.compile peers): seconds per dtype
    step "agent routes $dtype"
    timeout 30 $PY benchmarks/bench_kernels.py --ops agent --dtype "$dtype" --no-save --agent-routes "$ROUTES" \
        --peers "attnc TensorRT kernel" "2x sdpa" 2>&1 | tee -a "$LOG"
done

step "kernels fp16"
timeout 240 $PY benchmarks/bench_kernels.py --dtype fp16 --out "$OUT" 2>&1 | tee -a "$LOG"
for dtype in bf16 fp32; do
    step "kernels $dtype"
    timeout 60 $PY benchmarks/bench_kernels.py --dtype "$dtype" --out "$OUT" 2>&1 | tee -a "$LOG"
done

step "gpu-marked tests"
timeout 45 $PY -m pytest -m gpu -p no:xdist -p no:cacheprovider -q tests 2>&1 | tail -20 | tee -a "$LOG"
step "done"
