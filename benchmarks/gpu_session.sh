#!/usr/bin/env bash
# Every check that needs a GPU, for a lent device (the `device` tool gives a session 15 minutes
# in all, start-up and idle time included, so this is prepared and tested here first).
#
#   here, once:  bash benchmarks/gpu_session.sh --fetch-wheels     # peers' wheels into .whl/ (ignored)
#   device:      run(command="bash benchmarks/gpu_session.sh core", carry=[".whl"], timeout_s=560)
#                or parts of it: "bash benchmarks/gpu_session.sh sweep; bash ... bench fp16 linear=180"
#                then at once, while the machine is warm:
#                run(command="bash benchmarks/gpu_session.sh more", carry=[".whl"], timeout_s=<what is left>)
#
# On the device (its image has torch, triton, onnx, onnxruntime, click, rich; nothing can be
# downloaded there) it installs attnc offline without dependencies plus the carried peer wheels
# (flash-linear-attention, fla-core, lightning-attn; NATTEN ships only a source distribution
# that needs a long CUDA build, so its peer is skipped), then
#   core: 1. tests/plugins/test_kernels.py's interpreter sweep (every op, dtype, odd size and the
#            TensorRT entry points) compiled and run on the GPU against float64;
#         2. benchmarks/bench_kernels.py in fp16, one op at a time under its own time limit: every
#            kernel against its peers at realistic sizes, with its error against float64, each agent
#            case's fused-TensorRT-kernel vs two-SDPA timing into the agent route table;
#         3. the agent route pair alone in bf16 and fp32 (seconds per dtype).
#   more: bench_kernels.py in bf16 and fp32 (the full peer set), as time allows.
# Raw results and the log land in $OUT (at most 8 files come back); copy them into
# benchmarks/results/ and summarise them in benchmarks/RESULTS.md; merge agent-routes.json into
# plugins/agent/routes.json with attnc.plugins.agent.routes.record (the routes attnc compile follows).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .git/info && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
    exec python3 -m pip download --no-deps --only-binary=:all: -d .whl \
        flash-linear-attention==0.6.0 fla-core==0.6.0 lightning-attn==0.0.5
fi

PHASE="${1:-core}"; shift || true
USAGE="usage: gpu_session.sh [core | more | sweep | bench DTYPE OP=SECONDS... | routes DTYPE SECONDS | --fetch-wheels]"
case "$PHASE" in core|more|sweep|bench|routes) ;; *) echo "$USAGE" >&2; exit 2 ;; esac
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu-session.log"
PY="${ATTNC_PY:-python3}"   # ATTNC_PY: a wrapper, to dry-run this script on CPU
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

sweep() {
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
from test_kernels import CASES   # each op runs these and one random case (a timeout leaves some out)
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
bad = [r for r in rows if "exception" in r or max(r["errors"]) > r["tol"]]
ran = collections.Counter(r["op"] for r in rows)
print(f"{len(rows)} of {sum(map(len, CASES.values())) + len(CASES)} cases ran, {len(rows) - len(bad)} within tolerance "
      "(fp32 1e-4, fp16/bf16 1e-2 of max |ref|); per op: "
      + ", ".join(f"{op} {ran[op]}/{len(cases) + 1}" for op, cases in CASES.items()))
for r in bad:
    print("  FAIL", r["op"], r["case"], r.get("exception") or r["errors"], "seed", r["seed"])
SUMMARY
}

ROUTES="$OUT/agent-routes.json"   # -> plugins/agent/routes.json (attnc compile's agent routes)

# bench DTYPE OP=SECONDS...: bench_kernels.py one op at a time, each under its own time limit (a
# slow op's compiles cannot starve the others), every agent case recorded in the route table, then
# the ops' raw files merged into one for the dtype (at most 8 files come back from $OUT).
bench() {
    local dtype=$1 op limit item; shift
    mkdir -p "$OUT/$dtype"
    for item in "$@"; do
        op=${item%=*} limit=${item#*=}
        step "kernels $dtype $op (${limit} s)"
        timeout "$limit" $PY benchmarks/bench_kernels.py --ops "$op" --dtype "$dtype" --out "$OUT/$dtype" \
            --agent-routes "$ROUTES" 2>&1 | tee -a "$LOG"
    done
    $PY - "$OUT/$dtype" "$OUT" <<'MERGE' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
parts = sorted(pathlib.Path(sys.argv[1]).glob("kernels-*.json"))
if parts:
    runs = [json.loads(p.read_text()) for p in parts]
    merged = {"machine": runs[0]["machine"], "results": [r for run in runs for r in run["results"]],
              "ceilings_per_run": [run["machine"]["ceilings"] for run in runs]}
    name = parts[0].name.rsplit("-", 1)[0] + ".json"   # kernels-<device>-<dtype>-<date>.json
    pathlib.Path(sys.argv[2], name).write_text(json.dumps(merged, indent=1))
    print(f"merged {len(parts)} runs, {len(merged['results'])} cases -> {name}")
    for p in parts:
        p.unlink()
MERGE
    rmdir "$OUT/$dtype" 2>/dev/null
}

# routes DTYPE SECONDS: the agent route pair alone (no torch.compile peers) into the route table.
routes() {
    step "agent routes $1"
    timeout "$2" $PY benchmarks/bench_kernels.py --ops agent --dtype "$1" --no-save --agent-routes "$ROUTES" \
        --peers "attnc TensorRT kernel" "2x sdpa" 2>&1 | tee -a "$LOG"
}

case "$PHASE" in
core)   # ~6.5 min on an H200 (2026-12-04), most of it compiling (triton, torch.compile, fla's autotuning);
    sweep  # at most ~545 s with every limit reached
    bench fp16 neighborhood=90 linear=160 flow=45 agent=70
    routes bf16 25
    routes fp32 40 ;;
more)
    bench bf16 neighborhood=60 linear=120 flow=30 agent=30
    bench fp32 neighborhood=60 linear=120 flow=30 agent=30 ;;
sweep) sweep ;;
bench) bench "$@" ;;
routes) routes "$@" ;;
esac
# No gpu-marked tests: they build TensorRT engines, and the device's image has no TensorRT (its
# wheels come only from NVIDIA's index; TensorRT-RTX's libraries are 228 MB, over what a call carries).
step "done"
