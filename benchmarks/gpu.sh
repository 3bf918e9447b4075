#!/usr/bin/env bash
# Every GPU figure docs/benchmarks.md promises, in one run of at most 9.5 minutes on one H200 (bf16): the layer
# benchmark at the SD1.5, SD3.5-medium and FLUX.1 shapes (r = 8 and 32), the SD1.5 UNet step at 512 px (with
# peft's HRA), the SDXL UNet step at 1024 px, and the SD3.5-medium (full depth) and FLUX.1-dev (1 double + 2 single
# blocks, full width: at 4 + 8 blocks the frozen baseline itself died in cuBLAS) transformer steps at 1024 px,
# r = 8 and 32. The limits are session 6's H200 times plus a margin; peft's HRA is timed in the layer tables and the
# SD1.5 step only (on the bigger models it alone overran them). Why one script: a GPU is lent for minutes, by chance, so
# everything must be ready to run as written. Nothing is downloaded (random weights from the real configs).
#
#   benchmarks/gpu.sh OUT_DIR                     # on the GPU machine: .venv/bin/python, else python3, or $PYTHON
#   HRA_BENCH_SMOKE=1 benchmarks/gpu.sh OUT_DIR   # a dry run on CPU with tiny settings: checks every piece runs
#
# Each piece runs under its own time limit (a stuck or slow piece cannot eat the others' time) and writes
# OUT_DIR/NAME.json (raw numbers), NAME.md (tables, ratios, verdicts) and NAME.log; OUT_DIR/summary.md gathers the
# reports and each piece's exit status (124: its time limit) and seconds.
set -uo pipefail

out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[[ -z ${PYTHON:-} && ! -x $py ]] && py=python3  # no .venv (a lent GPU machine: the packages carried as wheels)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ ${HRA_BENCH_SMOKE:-0} == 1 ]]; then
    # later options win in argparse: these shrink every piece to minutes on a CPU, same code paths
    layer_smoke=(--device cpu --dtype fp32 --shapes sd15 --rounds 1 --cell-seconds 0)
    step_smoke=(--device cpu --dtype fp32 --resolution 64 --steps 1 --peft-hra-steps 1 --warmup 1)
    sdxl_smoke=(--modes lora ours)  # three fp32 SDXL UNets do not fit in 24 GiB at once
    sd35_smoke=(--depth 2 --text-tokens 16)
    flux_smoke=(--depth 1 --text-tokens 16)
    scale=10  # time limits x10 on a CPU
else
    layer_smoke=() step_smoke=() sdxl_smoke=() sd35_smoke=() flux_smoke=()
    scale=1
    if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "no CUDA device for $py (HRA_BENCH_SMOKE=1 for the CPU dry run)" >&2
        exit 1
    fi
fi

echo "# GPU benchmarks ($(date -u +%Y-%m-%dT%H:%MZ))" >"$out/summary.md"
"$py" - >>"$out/summary.md" <<'EOF'
import platform, torch, diffusers, peft
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run)"
print(f"\n{gpu}; torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
      f"Python {platform.python_version()}")
EOF

total=$SECONDS
# piece NAME LIMIT_SECONDS SCRIPT ARGS...: runs SCRIPT with --json/--markdown into $out, under the limit
piece() {
    local name=$1 limit=$(($2 * scale)) script=$3 start=$SECONDS rc
    shift 3
    echo "== $name (limit ${limit} s)"
    timeout -k 10 "$limit" "$py" "benchmarks/$script" "$@" --json "$out/$name.json" --markdown "$out/$name.md" \
        >"$out/$name.log" 2>&1
    rc=$?
    printf '\n## %s\n\nexit %s after %s s: `%s %s`\n\n' "$name" "$rc" $((SECONDS - start)) "$script" "$*" \
        >>"$out/summary.md"
    [[ -f $out/$name.md ]] && cat "$out/$name.md" >>"$out/summary.md"
    echo "   exit $rc after $((SECONDS - start)) s"
}

gpu=(--device cuda --dtype bf16)
piece layers-sd15 35 hra_layer.py "${gpu[@]}" --shapes sd15 --ranks 8,32 --batch 2 --rounds 7 --cell-seconds 0.05 \
    "${layer_smoke[@]}"
piece layers-mmdit 55 hra_layer.py "${gpu[@]}" --shapes sd35 flux flux-mlp --ranks 8,32 --batch 1 --rounds 7 \
    --cell-seconds 0.05 "${layer_smoke[@]}"
steps=(--steps 8 --peft-hra-steps 4)
piece unet-sd15-512 110 unet_step.py "${gpu[@]}" "${steps[@]}" --arch sd15 --resolution 512 "${step_smoke[@]}"
fast=(--modes frozen lora ours)
piece unet-sdxl-1024 100 unet_step.py "${gpu[@]}" "${steps[@]}" "${fast[@]}" --arch sdxl --resolution 1024 \
    "${step_smoke[@]}" "${sdxl_smoke[@]}"
for r in 8 32; do
    piece "sd35-1024-r$r" 80 transformer_step.py "${gpu[@]}" "${steps[@]}" "${fast[@]}" --arch sd35 --resolution 1024 \
        --r "$r" "${step_smoke[@]}" "${sd35_smoke[@]}"
    piece "flux-1024-r$r" 50 transformer_step.py "${gpu[@]}" "${steps[@]}" "${fast[@]}" --arch flux --depth 1 \
        --resolution 1024 --r "$r" "${step_smoke[@]}" "${flux_smoke[@]}"
done
printf '\nall pieces: %s s\n' $((SECONDS - total)) | tee -a "$out/summary.md"
