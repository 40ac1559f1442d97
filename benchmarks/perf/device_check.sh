#!/usr/bin/env bash
# Device check (issue 16 item 6): one prepared script for a machine with a CUDA GPU, within 8 minutes.
#
#   1. facts: nvidia-smi, torch / CUDA / cuDNN versions, the GPU and its memory;
#   2. the CUDA-marked tests: python -m pytest -q -m cuda tests/test_cuda.py (quantized encoders on the GPU,
#      a real out-of-memory halving, LSQ training on the GPU, qbench eval --device cuda end to end);
#   3. benchmarks/perf/device_check.py: toy, random-init ViT-B/32 and ViT-L/14 on the toy-id suite (500 images,
#      224 px for the ViTs), FP32 vs minmax / smoothquant / quarot / lsq at W8A8: throughput (images/s), the P2
#      and P4 ratios and peak GPU memory, one line per case, and device_check.json.
#
# Usage: bash benchmarks/perf/device_check.sh [--dry-run]
#   --dry-run: the same steps on the CPU with tiny sizes (toy model on 64 images, ViT-B/32 on 2, no ViT-L/14);
#   the CUDA tests then report themselves as skipped. Runs to completion in a few minutes on a laptop.
# Outputs go under $OUT if set, else under a new temporary folder (printed); nothing else is written.
# Exit status: 0 when the tests passed (or were skipped) and every evaluation verified, 1 otherwise.
set -euo pipefail

dry_run=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $arg (use --dry-run or nothing)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/../.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
out="${OUT:-$(mktemp -d -t qbench-device-check.XXXXXX)}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export QBENCH_STORE="$out/store.sqlite" QBENCH_CACHE="$out/cache" XDG_CONFIG_HOME="$out/xdg-config"
unset QBENCH_CONFIG QBENCH_DATA
started=$SECONDS
status=0

echo "== device check $( ((dry_run)) && echo '(dry run: CPU, tiny sizes)' ) -> $out"
echo "== 1. facts"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu --format=csv || true
else
  echo "nvidia-smi: not found"
fi
python - <<'PY'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}, cpu threads {torch.get_num_threads()}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    print(f"gpu {props.name}, capability {props.major}.{props.minor}, {total / 2**30:.1f} GiB "
          f"({free / 2**30:.1f} GiB free), cuDNN {torch.backends.cudnn.version()}, "
          f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, TF32 cuDNN {torch.backends.cudnn.allow_tf32}")
PY

echo "== 2. CUDA-marked tests ($((SECONDS - started)) s)"
if ! timeout 180 python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -rs \
     --junitxml="$out/test_cuda.xml" 2>&1 | tee "$out/test_cuda.log"; then
  echo "CUDA tests: FAILED or timed out (log: $out/test_cuda.log)"
  status=1
fi

echo "== 3. throughput, P2, P4, peak GPU memory ($((SECONDS - started)) s)"
measure=(python benchmarks/perf/device_check.py --out "$out")
if ((dry_run)); then
  measure+=(--dry-run)
else
  measure+=(--budget-s 180)
fi
if ! timeout 260 "${measure[@]}" 2>&1 | grep -v "No pretrained weights loaded" | tee "$out/device_check.log"; then
  echo "device_check.py: FAILED, unverified or timed out (log: $out/device_check.log)"
  status=1
fi

echo "== done in $((SECONDS - started)) s, status $status; outputs in $out"
exit "$status"
