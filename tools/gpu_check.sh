#!/usr/bin/env bash
# GPU check for a maintainer with one CUDA device (H100/A100 class; meant to finish within 5 minutes).
#
#   tools/gpu_check.sh                 # correctness, then benchmarks; JSON records under gpu_check_out/
#   OUT_DIR=/tmp/gc COMPILE=0 tools/gpu_check.sh   # skip the torch.compile rows (they cost most of the time)
#
# 1. Correctness of the bf16 + flash-attention path against an fp32 reference (math SDPA, no TF32):
#    ViT-B/16 logits: relative L2 error <= 3e-2 and cosine >= 0.999; MAE (ViT-B, paper decoder) loss with
#    fixed noise: relative error <= 5e-3. bf16 keeps 8 mantissa bits (~4e-3 per rounding, compounded over 12
#    blocks); the same comparison under CPU autocast gives ~1.0e-2 / cosine 0.99995 for the logits and
#    <= 2.5e-4 for the loss (an average over many patches), so the bounds leave 3x and 20x margin.
#    The flash kernel is forced, so a build or GPU without it fails here instead of silently falling back.
# 2. Benchmarks: vit_base_patch16_224 at batch 256 against timm (fp32 and bf16); mae_vit_base_patch16 at
#    batch 256 in bf16 (mask 0.75 vs 0.0, ours vs the reference MAE); then both in bf16 eager vs torch.compile
#    (ours only). The compiled rows take most of the time (one static graph per case); COMPILE=0 skips them.
# Not yet run on a GPU: the timings above are estimates; please report the first run's wall time.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
OUT_DIR=${OUT_DIR:-gpu_check_out}
COMPILE=${COMPILE:-1}
BATCH=${BATCH:-256}
MAE_BATCH=${MAE_BATCH:-256}
mkdir -p "$OUT_DIR"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found; this script needs a CUDA machine" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')"

echo "== correctness: bf16 + flash SDPA vs fp32 =="
"$PY" - <<'EOF'
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import vit

torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
torch.backends.cudnn.allow_tf32 = False
dev = torch.device("cuda")
torch.manual_seed(0)
failures = []


def check(name: str, value: float, bound: float, worse_if_above: bool = True) -> None:
    ok = value <= bound if worse_if_above else value >= bound
    print(f"  {name:40s} {value:.5g}  ({'<=' if worse_if_above else '>='} {bound:g})  {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(name)


model = vit.create_model("vit_base_patch16_224").to(dev).eval()
x = torch.randn(16, 3, 224, 224, device=dev)
with torch.no_grad():
    with sdpa_kernel(SDPBackend.MATH):
        ref = model(x).float()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        got = model(x).float()
rel = ((got - ref).norm() / ref.norm()).item()
cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
check("vit_base_patch16_224 logits rel L2", rel, 3e-2)
check("vit_base_patch16_224 logits cosine", cos, 0.999, worse_if_above=False)

mae = vit.create_model("mae_vit_base_patch16").to(dev).train()
imgs = torch.randn(16, 3, 224, 224, device=dev)
noise = torch.rand(16, 196, device=dev)
with sdpa_kernel(SDPBackend.MATH):
    loss_ref = mae(imgs, 0.75, noise)[0].float()
with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
    loss = mae(imgs, 0.75, noise)[0].float()
    loss.backward()
check("mae_vit_base_patch16 loss rel error", abs((loss - loss_ref) / loss_ref).item(), 5e-3)
finite = all(torch.isfinite(p.grad).all() for p in mae.parameters() if p.grad is not None)
check("mae bf16 backward: non-finite grads", float(not finite), 0.0)
sys.exit(f"gpu_check: {len(failures)} check(s) failed: {failures}" if failures else 0)
EOF

echo "== benchmark: vit_base_patch16_224, batch $BATCH, ours vs timm, fp32 and bf16 =="
"$PY" tools/benchmark.py --device cuda --model vit_base_patch16_224 --batch-size "$BATCH" --against timm \
    --dtype both --repeats 5 --warmup 3 --json "$OUT_DIR/vit_base.json"

echo "== benchmark: mae_vit_base_patch16, batch $MAE_BATCH, bf16: mask 0.75 vs 0.0, ours vs reference =="
"$PY" tools/benchmark.py --device cuda --mae --model mae_vit_base_patch16 --batch-size "$MAE_BATCH" \
    --dtype bf16 --repeats 5 --warmup 3 --json "$OUT_DIR/mae_base.json"

if [ "$COMPILE" = "1" ]; then
    # ours only: each compiled case is its own static graph (tens of seconds each), the comparators would double it
    echo "== benchmark: vit_base_patch16_224, batch $BATCH, bf16, eager vs torch.compile =="
    "$PY" tools/benchmark.py --device cuda --model vit_base_patch16_224 --batch-size "$BATCH" \
        --dtype bf16 --compile --repeats 5 --warmup 3 --json "$OUT_DIR/vit_base_compile.json"
    echo "== benchmark: mae_vit_base_patch16, batch $MAE_BATCH, bf16, eager vs torch.compile =="
    "$PY" tools/benchmark.py --device cuda --mae --against none --model mae_vit_base_patch16 \
        --batch-size "$MAE_BATCH" --dtype bf16 --compile --repeats 5 --warmup 3 --json "$OUT_DIR/mae_base_compile.json"
fi

echo "gpu_check: all done; JSON records in $OUT_DIR/"
