"""Shared fixtures: tiny LLaMA-shaped checkpoints written as real safetensors files, configs, the CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

os.environ.setdefault("OMP_NUM_THREADS", "1")
# the suite runs its tiny merges on real worker processes; tests that want the in-driver path say so
os.environ.setdefault("TADROP_INLINE_BYTES", "0")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

TINY = dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, vocab=64)


def llama_config(hidden, layers, heads, kv_heads, intermediate, vocab) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32",
        "hidden_act": "silu", "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
    }


def llama_shapes(hidden, layers, heads, kv_heads, intermediate, vocab) -> dict[str, tuple]:
    head = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    return shapes


def make_family(root: Path, k: int = 3, dtype=torch.float32, seed: int = 0, names=None, **sizes):
    """A base and k fine-tunes (HF dirs). Deltas: per-tensor, per-task scale and tail shape, so
    TADrop's drop rate differs between tensors and tasks."""
    sz = {**TINY, **sizes}
    shapes = llama_shapes(**sz)
    names = names or [f"task{i}" for i in range(k)]
    g = torch.Generator().manual_seed(seed)
    base = {n: (torch.randn(s, generator=g) * 0.05 + (1.0 if len(s) == 1 else 0.0)) for n, s in shapes.items()}
    paths = {"base": write_hf(root / "base", {n: t.to(dtype) for n, t in base.items()}, llama_config(**sz))}
    for ti, name in enumerate(names):
        sd = {}
        for j, (n, t) in enumerate(sorted(base.items())):
            scale = 10 ** (-3 + 1.5 * torch.rand((), generator=g).item())
            noise = torch.randn(t.shape, generator=g)
            heavy = laplace(t.shape, g) if (j + ti) % 2 else noise
            sparse = (torch.rand(t.shape, generator=g) < 0.3 + 0.6 * ((j * 7 + ti) % 5) / 5)
            sd[n] = (t + scale * torch.where(sparse, heavy, noise * 0.1)).to(dtype)
        paths[name] = write_hf(root / name, sd, llama_config(**sz))
    return paths


def laplace(shape, g: torch.Generator) -> torch.Tensor:
    """Laplace(0, 1) noise from the family's own generator (inverse CDF), so a family depends on its
    seed alone, never on what the global RNG drew before."""
    u = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs()).clamp(min=-40.0)).float()


def write_hf(d: Path, sd: dict, config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
        (d / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return d


def write_hf_family(root: Path, base: dict, tasks: list) -> dict:
    """base + tasks (state dicts) as checkpoints under root: {"base": dir, "t0": dir, ...}."""
    fam = {"base": write_hf(root / "base", base)}
    for k, t in enumerate(tasks):
        fam[f"t{k}"] = write_hf(root / f"t{k}", t)
    return fam


def write_config(path: Path, family: dict, output: Path, **kw) -> Path:
    names = [n for n in family if n != "base"]
    cfg = {"base": str(family["base"]),
           "models": [{"name": n, "path": str(family[n])} for n in names],
           "output": str(output), "workers": 2, "memory_budget": "256MiB"}
    cfg.update(kw)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(*args, env_extra: dict | None = None, check: bool = False, timeout: int = 300):
    """Run the real `tadrop` CLI in a subprocess (the way users and CI do)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tadrop {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def tree_digest(root: Path, skip=(".tadrop", "run.json")) -> dict[str, str]:
    """sha256 of every file under root (relative path -> digest), for byte-for-byte comparisons."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in skip:
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """Three float32 fine-tunes of a tiny LLaMA (read-only: tests must not modify inputs)."""
    return make_family(tmp_path_factory.mktemp("family"), k=3, dtype=torch.float32, seed=1)


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family_bf16"), k=4, dtype=torch.bfloat16, seed=2)
