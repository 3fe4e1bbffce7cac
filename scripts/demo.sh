#!/usr/bin/env bash
# The README's first command: install, make the small demo checkpoints (a LLaMA-shaped
# base + math/code/chat/multilingual fine-tunes, ~8 MB each) if demo/ lacks them, merge
# them with EMR + TADrop, show the run's status, and export one task's model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

bash scripts/setup.sh
if command -v tadrop >/dev/null 2>&1; then TADROP=(tadrop); else TADROP=("$PY" -m pipeline.cli); fi

if [ ! -f demo/demo_models.json ]; then
  "$PY" scripts/make_demo_models.py --out demo
fi

"${TADROP[@]}" merge configs/demo.yaml
"${TADROP[@]}" status runs/demo
rm -rf runs/demo-math
"${TADROP[@]}" export runs/demo --task math --output runs/demo-math

# The exported task model is an ordinary Hugging Face checkpoint.
"$PY" - <<'PY'
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("runs/demo-math")
with torch.no_grad():
    logits = m(torch.tensor([[1, 2, 3, 4]])).logits
print(f"runs/demo-math loads: {type(m).__name__}, {sum(p.numel() for p in m.parameters()):,} "
      f"parameters, logits finite: {bool(torch.isfinite(logits).all())}")
PY
echo "done: merged run in runs/demo (unified/, masks.zarr/, stats.parquet, run.json), math model in runs/demo-math"
