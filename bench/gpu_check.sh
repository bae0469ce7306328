#!/usr/bin/env bash
# Everything that needs a GPU, in one call with a bounded time (about 8 minutes on an H100/H200):
# the GPU tests (pytest -m gpu), then the two speed bars (LoRA and full fine-tuning, each against its
# peers in the same process, with a profile of ours), logs and records under one folder.
#
#   bench/gpu_check.sh --out DIR                # on the GPU machine
#   bench/gpu_check.sh --out DIR --shape tiny   # on a CPU first: the same steps on a tiny model, the GPU
#                                               # tests as a dry run (KFTUNE_GPU_TESTS_ON=cpu), to catch mistakes for free
#
# DIR gets summary.txt (one line per part: exit code, seconds), a log per part, gpu_throughput.jsonl
# (the records to append to bench/results/) and the profiles. Each part has its own time limit, so one
# that hangs or fails leaves the others their time. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

shape=llama-1b
out=gpu_check
while [ $# -gt 0 ]; do
    case "$1" in
        --shape) shape=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "usage: bench/gpu_check.sh [--out DIR] [--shape llama-1b|tiny]" >&2; exit 2 ;;
    esac
done
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$shape" = tiny ]; then
    export KFTUNE_GPU_TESTS_ON=cpu
    limits=(900 600 600)  # a loaded 2-core CPU is slow; the tiny run checks the plumbing, not the time
else
    limits=(110 300 70)  # 8 minutes at most (measured on an H200: 94, 145 and 45 s before the autocast peers)
fi

part() {  # part NAME SECONDS COMMAND...: run it with its own limit, log to DIR/NAME.log, one summary line
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    printf '%-6s exit %-3s %4d s  %s\n' "$name" "$rc" $((SECONDS - started)) "$*" | tee -a "$out/summary.txt"
}

{
    echo "gpu_check $(date -u +%FT%TZ) shape=$shape"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi (CPU run)"
    "$python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} | tee "$out/summary.txt"

part tests "${limits[0]}" "$python" -m pytest -m gpu -v -rs -p no:cacheprovider tests/test_gpu.py
part lora "${limits[1]}" "$python" bench/gpu_throughput.py --shape "$shape" --method lora --steps 8 --ours ckpt=2 eager compile compile+ckpt=2 \
    --profile "$out/profile_lora.txt" --results "$out/gpu_throughput.jsonl"
part full "${limits[2]}" "$python" bench/gpu_throughput.py --shape "$shape" --method full --steps 8 \
    --profile "$out/profile_full.txt" --results "$out/gpu_throughput.jsonl"

echo "---- tests"
grep -E "^(PASSED|FAILED|SKIPPED|ERROR)|(passed|failed|error)" "$out/tests.log" | tail -n 20
for name in lora full; do
    echo "---- $name"
    grep -E "tokens/s|best peer|matrix rate|Error|error:" "$out/$name.log" | tail -n 12
done
