#!/usr/bin/env bash
# The GPU check: what BENCHMARKS.md's GPU section waits for, on one GPU in under 8 minutes, one line per result.
#
#   bash benchmarks/gpu_check.sh [OUT]        # from the repository root, after the README's test command
#
# 1. bench at SDXL shape (1024 px) and SD3.5-medium shape (512 px): the published UNet/transformer configs with
#    random weights (`make-tiny --shaped`), bf16, LoRA from the cache and the full fine-tune against a precomputed
#    reference, with MFU (bench knows the H100/H200/A100/L40S/A10G/L4 peaks);
# 2. the `gpu`-marked tests: FSDP and DeepSpeed runs, their sharded checkpoints and resumes;
# 3. a LoRA on the SD3.5-medium-shaped base quantized to int8, nf4 and fp8 (model.quantize_base; fp8 needs torchao);
# 4. the cache built by every process of an `accelerate launch` on one GPU's worth of processes is not run here
#    (one GPU); the CPU suite covers it over gloo.
# Every step has its own time limit; a failed step is reported and the others still run. Logs and JSON: OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/dpo-gpu-check}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, one line
    local name=$1 limit=$2 began rc
    shift 2
    began=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        say "$name: ok in $(( $(date +%s) - began )) s"
    else
        say "$name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit')) in $(( $(date +%s) - began )) s: $(tail -n 1 "$OUT/$name.log")"
    fi
}

say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
say "torch: $($PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())')"

step make-sdxl 150 $PY -m diffusion_dpo make-tiny --output-dir "$OUT/models" --resolution 1024 --num-pairs 32 \
    --shaped sdxl
step make-sd35 150 $PY -m diffusion_dpo make-tiny --output-dir "$OUT/models512" --resolution 512 --num-pairs 32 \
    --shaped sd35-medium

bench() {  # bench NAME CONFIG MODEL DATA RESOLUTION MODES [OVERRIDES...]
    step "bench-$1" 150 $PY -m diffusion_dpo bench --config "$2" --model.pretrained "$3" --data.path "$4" \
        --data.resolution "$5" --data.batch_size 2 --data.num_workers 2 --train.mixed_precision bf16 \
        --train.gradient_checkpointing true --modes $6 --steps 6 --warmup 2 --floor-repeats 5 \
        --json "$OUT/bench-$1.json" --markdown "$OUT/bench-$1.md" "${@:7}"
}
bench sdxl-1024 configs/sdxl_pickapic.yaml "$OUT/models/sdxl" "$OUT/models/pickapic" 1024 "lora+cache precomputed"
bench sd35-medium-512 configs/sd35_medium_lora.yaml "$OUT/models512/sd35-medium" "$OUT/models512/pickapic" 512 \
    "lora+cache precomputed"
# a LoRA on a quantized frozen base (model.quantize_base): peak memory and speed against the bf16 base above
for q in int8 nf4 fp8; do
    bench "sd35-medium-512-$q" configs/sd35_medium_lora.yaml "$OUT/models512/sd35-medium" "$OUT/models512/pickapic" \
        512 "lora+cache" --model.quantize_base "$q"
done

step gpu-tests 200 $PY -m pytest -q -p no:cacheprovider -n 0 -m gpu tests/

# one line per bench result
for f in "$OUT"/bench-*.json; do
    [ -f "$f" ] || continue
    $PY - "$f" <<'EOF' | tee -a "$SUMMARY"
import json, sys
for r in json.load(open(sys.argv[1])):
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    print(f"{sys.argv[1].split('bench-')[-1][:-5]} {r['mode']}: {r['pairs_per_s']:.2f} pairs/s, step "
          f"{1e3 * r['step_s']:.0f} ms, step/floor {r['step_over_floor']:.2f}, MFU {mfu}, peak "
          f"{r['peak_memory_mib'] / 1024:.1f} GiB ({r['device']}, {r['mixed_precision']}, {r['resolution']} px)")
EOF
done
say "summary: $SUMMARY"
