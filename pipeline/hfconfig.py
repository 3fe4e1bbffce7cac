"""The base's non-weight files (config, tokenizer, generation config) in an output checkpoint, with
config.json saying the dtype the checkpoint really holds.

transformers loads a checkpoint in the dtype its config.json names (`torch_dtype`; `dtype` since
transformers 4.56): a float32 merge of a bf16 base still labelled bfloat16 silently loads as bf16.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from .checkpoints import Checkpoint
from .writers import ShardPlan, atomic_write_bytes

# safetensors dtype codes -> the names transformers writes in config.json
_HF_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
DTYPE_KEYS = ("torch_dtype", "dtype")


def written_dtype(plan: ShardPlan) -> str | None:
    """The floating dtype holding most of the checkpoint's bytes (None: no floating tensor)."""
    by_bytes: Counter = Counter()
    for shard in plan.shards:
        for t in shard.tensors.values():
            if t.dtype in _HF_NAMES:
                by_bytes[_HF_NAMES[t.dtype]] += t.nbytes
    return by_bytes.most_common(1)[0][0] if by_bytes else None


def _set_dtype(cfg: dict, dtype: str, top: bool) -> None:
    """torch_dtype at the top level always, `dtype` where the base has it; nested sub-configs
    (text_config, vision_config...) keep their keys but get the new value."""
    for key in DTYPE_KEYS:
        if key in cfg or (top and key == "torch_dtype"):
            cfg[key] = dtype
    for v in cfg.values():
        if isinstance(v, dict) and any(k in v for k in DTYPE_KEYS):
            _set_dtype(v, dtype, False)


def copy_non_weight_files(base: Checkpoint, dest: Path, plan: ShardPlan) -> None:
    """Copy the base's non-weight files into `dest`; config.json names the dtype written."""
    dtype = written_dtype(plan)
    for f in base.non_weight_files():
        if f.name == "config.json" and dtype is not None:
            try:
                cfg = json.loads(f.read_text())
            except (OSError, ValueError):
                cfg = None          # not ours to repair: copy it as it is
            if isinstance(cfg, dict):
                _set_dtype(cfg, dtype, True)
                atomic_write_bytes(dest / f.name, (json.dumps(cfg, indent=2) + "\n").encode())
                continue
        shutil.copy2(f, dest / f.name)
