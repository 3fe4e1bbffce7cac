"""Tiny random transformers models, PEFT adapters on them, and a real Hugging Face cache layout
(refs/, snapshots/ symlinked into blobs/), all built offline for the input-source tests."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch


def tiny_llama(vocab=64, tie=False, seed=0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def perturb_(model, seed, scale=0.01):
    """Give every parameter (biases included) a nonzero random value so nothing is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def save(model, d: Path, **kw) -> Path:
    model.save_pretrained(d, **kw)
    return Path(d)


def make_adapter(base_dir: Path, out: Path, loader, seed=1, **lora_kw) -> Path:
    """A PEFT adapter with random (nonzero) A and B on a fresh copy of the base; returns its dir."""
    import peft
    torch.manual_seed(seed)
    model = loader(base_dir)
    cfg_cls = lora_kw.pop("config_cls", peft.LoraConfig)
    if cfg_cls is peft.LoraConfig:
        lora_kw.setdefault("init_lora_weights", False)
    pm = peft.get_peft_model(model, cfg_cls(**lora_kw))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():   # nonzero trained-looking values everywhere the adapter saves
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pm.save_pretrained(out)
    return Path(out)


def peft_merged(base_dir: Path, adapter_dir: Path, loader) -> dict[str, torch.Tensor]:
    """peft's own merge_and_unload() of the adapter onto the base: the parity reference."""
    import peft
    model = loader(base_dir)
    pm = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def hf_cache(cache: Path, repo_id: str, src: Path, commit: str | None = None, ref: str = "main") -> str:
    """Put the files of `src` into a real hub cache layout under `cache` (as HF_HUB_CACHE); returns the commit."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in Path(src).rglob("*") if p.is_file())
    h = hashlib.sha1()
    for p in files:
        h.update(p.name.encode() + p.read_bytes())
    commit = commit or h.hexdigest()
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for p in files:
        blob = repo_dir / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snap / p.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return commit
