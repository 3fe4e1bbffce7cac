#!/usr/bin/env python3
"""Synthetic LLaMA checkpoints (a base and K fine-tunes) for the demo, tests and benchmark.

Fine-tune k is `round(base + delta_k)`. The delta of each (task, tensor) pair has
its own typical magnitude, its own tail heaviness (a Gaussian-to-cubed-Gaussian
mixture) and its own row sparsity, so TADrop's drop rate d = Q0.5/Q0.95 varies
from tensor to tensor and task to task as it does in real fine-tunes.

Everything is a pure function of (seed, task name, tensor name): task "math"
is the same whatever K is or where it sits in --names, and the output does not
depend on the thread count. Tensors are generated block by block into reused
buffers and written straight to their offsets in safetensors files whose
headers are laid out up front, so no model is ever held in memory.

    python3 scripts/make_demo_models.py                   # small demo into demo/
    python3 scripts/make_demo_models.py --out bench_data/models --hidden 2048 \\
        --layers 8 --intermediate 5632 --vocab 32000 --heads 16 --kv-heads 16 --k 16
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

DEMO_NAMES = ("math", "code", "chat", "multilingual")
MANIFEST = "demo_models.json"
BLOCK = 1 << 20  # elements a generator block covers; fixed so the bytes never depend on threads
DTYPES = {"bfloat16": (torch.bfloat16, "BF16"), "float32": (torch.float32, "F32")}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32"}
BASE_STD = 0.02

# Median |delta| per tensor kind (before per-task and per-tensor factors). Big
# enough against bf16's spacing near |base| ~ 0.02 (~1.2e-4) that the stored
# deltas are not mostly rounding; norms sit near 1, where the spacing is ~8e-3.
KIND_SCALE = {
    "embed_tokens": 6e-4, "lm_head": 8e-4, "q_proj": 7e-4, "k_proj": 7e-4,
    "v_proj": 1.1e-3, "o_proj": 1.1e-3, "gate_proj": 9e-4, "up_proj": 9e-4,
    "down_proj": 1.2e-3, "norm": 3e-2,
}
MED_ABS_NORMAL = 0.6744897501960817  # median of |N(0, 1)|


def default_names(k: int) -> list[str]:
    """The demo's four task names, then task04, task05, ... so K=4 is a prefix of K=16."""
    return [DEMO_NAMES[i] if i < len(DEMO_NAMES) else f"task{i:02d}" for i in range(k)]


def tensor_layout(hidden, layers, intermediate, vocab, heads, kv_heads) -> list[tuple[str, tuple]]:
    """LLaMA tensor names and shapes, in Hugging Face order."""
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} / heads {heads} / kv_heads {kv_heads} do not divide")
    kv = kv_heads * (hidden // heads)
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def _seed(*parts) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions."""
    key = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _kind(name: str) -> str:
    parts = name.split(".")
    return "norm" if parts[-2].endswith("norm") else parts[-2]


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 3 and parts[1] == "layers" else None


def delta_params(seed: int, task: str, name: str, layers: int) -> dict:
    """Per (task, tensor) shape of the delta: median magnitude, tail heaviness, row sparsity.

    heavy h mixes g and g^3 (alpha = 1 - h, beta = h): d = Q0.5/Q0.95 of |delta| goes
    from 0.34 (Gaussian) to 0.04 (cubed Gaussian); zeroed rows pull Q0.5 down further.
    """
    t = np.random.default_rng(_seed(seed, "task", task))
    task_scale = float(np.exp(t.normal(0.0, 0.35)))
    task_heavy = float(t.uniform(0.0, 0.5))
    r = np.random.default_rng(_seed(seed, "params", task, name))
    kind = _kind(name)
    layer = _layer(name)
    depth = 1.0 + (layer / max(1, layers - 1) if layer is not None else 0.5)
    scale = KIND_SCALE[kind] * task_scale * depth * float(10 ** r.uniform(-0.4, 0.4))
    heavy = float(np.clip(task_heavy + r.uniform(-0.3, 0.5), 0.0, 1.0) ** 1.5)
    if kind in ("embed_tokens", "lm_head"):
        sparsity = float(r.uniform(0.05, 0.4))  # tokens the task never saw barely move
    elif kind == "norm":
        sparsity = 0.0
    else:
        sparsity = float(r.uniform(0.0, 0.15)) if r.random() < 0.4 else 0.0
    return {"scale": scale, "heavy": heavy, "sparsity": sparsity}


class _Writer:
    """One safetensors file whose header is fixed up front; tensors land by pwrite."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple]], dtype: str):
        st_dtype = DTYPES[dtype][1]
        itemsize = torch.empty((), dtype=DTYPES[dtype][0]).element_size()
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in entries:
            nbytes = int(np.prod(shape)) * itemsize
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.offsets = {n: header[n]["data_offsets"][0] + 8 + len(raw) for n, _ in entries}
        self.data_bytes = off
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(self.fd, 8 + len(raw) + off)

    def close(self):
        os.close(self.fd)


def _shard_plan(layout, shards: int, itemsize: int) -> list[list[tuple[str, tuple]]]:
    """Split the tensor list, in order, into `shards` contiguous groups of similar size."""
    sizes = [int(np.prod(s)) * itemsize for _, s in layout]
    total, groups, cur, acc = sum(sizes), [], [], 0
    for (name, shape), size in zip(layout, sizes):
        if cur and acc + size / 2 > total * (len(groups) + 1) / shards and len(groups) < shards - 1:
            groups.append(cur)
            cur = []
        cur.append((name, shape))
        acc += size
    groups.append(cur)
    if len(groups) != shards:
        raise ValueError(f"cannot split {len(layout)} tensors into {shards} shards")
    return groups


def _config(hidden, layers, intermediate, vocab, heads, kv_heads, dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "initializer_range": BASE_STD,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype, "use_cache": True,
    }


class _Gen:
    """Reused buffers plus the block-wise kernels that fill them."""

    def __init__(self, numel_max: int, dtype: str, threads: int):
        self.base = torch.empty(numel_max)            # base, already rounded to the output dtype
        self.work = torch.empty(numel_max)            # delta / fine-tune in float32
        self.tmp = torch.empty(numel_max)             # g^2 scratch
        self.out = torch.empty(numel_max, dtype=DTYPES[dtype][0])
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def _map(self, fn, blocks):
        if self.pool is None:
            for b in blocks:
                fn(*b)
        else:
            list(self.pool.map(lambda b: fn(*b), blocks))

    @staticmethod
    def blocks(shape) -> list[tuple[int, int]]:
        """Row-aligned blocks of about BLOCK elements (rows, so row sparsity stays per block)."""
        rows = shape[0] if len(shape) > 1 else 1
        cols = int(np.prod(shape)) // rows
        step = max(1, BLOCK // cols)
        return [(r, min(rows, r + step)) for r in range(0, rows, step)]

    def tensor(self, seed, name, shape, tasks, writers, layers):
        """Write base and every task's version of one tensor."""
        n = int(np.prod(shape))
        rows = shape[0] if len(shape) > 1 else 1
        cols = n // rows
        is_norm = _kind(name) == "norm"
        blocks = self.blocks(shape)
        raw = self.out.view(torch.int16) if self.out.element_size() == 2 else self.out.view(torch.int32)

        def emit(fd, off, a, b):
            os.pwrite(fd, raw[a:b].numpy(), off + a * self.out.element_size())

        base_w = writers["base"]

        def base_block(bi, r0, r1):
            a, b = r0 * cols, r1 * cols
            g = torch.Generator().manual_seed(_seed(seed, "base", name, bi))
            x = self.base[a:b].normal_(0.0, 0.1 if is_norm else BASE_STD, generator=g)
            if is_norm:
                x.add_(1.0)
            self.out[a:b].copy_(x)
            x.copy_(self.out[a:b])  # fine-tunes start from the stored (rounded) base
            emit(base_w.fd, base_w.offsets[name], a, b)

        self._map(base_block, [(i, *blk) for i, blk in enumerate(blocks)])

        for task in tasks:
            p = delta_params(seed, task, name, layers)
            h = p["heavy"]
            alpha, beta = 1.0 - h, h
            # normalise so that the median |delta| is p["scale"] whatever the tails
            med = alpha * MED_ABS_NORMAL + beta * MED_ABS_NORMAL ** 3
            mul = p["scale"] / med
            zero_rows = None
            if p["sparsity"] > 0 and rows > 1:
                gz = torch.Generator().manual_seed(_seed(seed, "rows", task, name))
                zero_rows = torch.rand(rows, generator=gz) < p["sparsity"]
            w = writers[task]

            def task_block(bi, r0, r1):
                a, b = r0 * cols, r1 * cols
                g = torch.Generator().manual_seed(_seed(seed, "delta", task, name, bi))
                d = self.work[a:b].normal_(generator=g)
                if beta > 0:
                    s = torch.mul(d, d, out=self.tmp[a:b])
                    s.mul_(beta * mul).add_(alpha * mul)
                    d.mul_(s)
                else:
                    d.mul_(mul)
                if zero_rows is not None:
                    idx = zero_rows[r0:r1].nonzero().flatten()
                    if len(idx):
                        d.view(r1 - r0, cols).index_fill_(0, idx, 0.0)
                d.add_(self.base[a:b])
                self.out[a:b].copy_(d)
                emit(w.fd, w.offsets[name], a, b)

            self._map(task_block, [(i, *blk) for i, blk in enumerate(blocks)])

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def make_models(out_dir, hidden=256, layers=4, intermediate=688, vocab=2048, heads=4, kv_heads=2,
                k=4, dtype="bfloat16", shards=1, seed=0, names=None, *, threads=None) -> dict:
    """Write base/ and one dir per task under out_dir; return the manifest (also saved there).

    Each model dir is written under a temporary name and renamed when complete;
    the manifest is written last, so its presence means the whole set is there.
    """
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use bfloat16 or float32")
    names = list(names) if names else default_names(k)
    if len(names) != k or len(set(names)) != k or "base" in names:
        raise ValueError(f"need {k} distinct task names other than 'base', got {names}")
    if shards < 1:
        raise ValueError("shards must be >= 1")
    threads = threads or min(2, os.cpu_count() or 1)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    layout = tensor_layout(hidden, layers, intermediate, vocab, heads, kv_heads)
    itemsize = torch.empty((), dtype=DTYPES[dtype][0]).element_size()
    groups = _shard_plan(layout, shards, itemsize)
    files = (["model.safetensors"] if shards == 1 else
             [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)])
    config = _config(hidden, layers, intermediate, vocab, heads, kv_heads, dtype)
    gen_config = {"bos_token_id": 1, "eos_token_id": 2, "_from_model_config": True}
    models = ["base"] + names
    tmp = {m: out / f".{m}.partial" for m in models}
    for m in models:
        shutil.rmtree(tmp[m], ignore_errors=True)
        tmp[m].mkdir()
        (tmp[m] / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp[m] / "generation_config.json").write_text(json.dumps(gen_config, indent=2) + "\n")

    total_size = sum(int(np.prod(s)) * itemsize for _, s in layout)
    gen = _Gen(max(int(np.prod(s)) for _, s in layout), dtype, threads)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallelism comes from our block threads; avoid oversubscription
    try:
        for fname, group in zip(files, groups):
            writers = {m: _Writer(tmp[m] / fname, group, dtype) for m in models}
            try:
                for name, shape in group:
                    gen.tensor(seed, name, shape, names, writers, layers)
            finally:
                for w in writers.values():
                    w.close()
    finally:
        gen.close()
        torch.set_num_threads(torch_threads)

    if shards > 1:
        index = {"metadata": {"total_size": total_size},
                 "weight_map": {n: f for f, g in zip(files, groups) for n, _ in g}}
        for m in models:
            (tmp[m] / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for m in models:
        shutil.rmtree(out / m, ignore_errors=True)
        tmp[m].rename(out / m)

    manifest = {
        "params": {"hidden": hidden, "layers": layers, "intermediate": intermediate, "vocab": vocab,
                   "heads": heads, "kv_heads": kv_heads, "k": k, "dtype": dtype, "shards": shards,
                   "seed": seed, "names": names},
        "base": str(out / "base"),
        "tasks": {n: str(out / n) for n in names},
        "total_size": total_size,
        "files": files,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(out_dir) -> dict | None:
    """The manifest of a complete set under out_dir, or None."""
    p = Path(out_dir) / MANIFEST
    return json.loads(p.read_text()) if p.exists() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--k", type=int, default=None, help="number of fine-tunes (default: len(--names) or 4)")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 | float32")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--names", default=None, help="comma-separated task names")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    names = [s.strip() for s in a.names.split(",") if s.strip()] if a.names else None
    k = a.k if a.k is not None else (len(names) if names else len(DEMO_NAMES))
    m = make_models(a.out, a.hidden, a.layers, a.intermediate, a.vocab, a.heads, a.kv_heads, k,
                    a.dtype, a.shards, a.seed, names, threads=a.threads)
    if not a.quiet:
        gb = m["total_size"] / 1e9
        print(f"wrote base + {k} fine-tunes ({gb:.3f} GB each) to {a.out}/ in {m['seconds']:.1f} s: "
              f"{', '.join(m['tasks'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
