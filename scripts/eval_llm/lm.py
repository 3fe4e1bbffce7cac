"""The small LLaMA-architecture model: pretraining, full and LoRA fine-tunes,
and held-out per-sequence loss.

Why so small: the whole benchmark (pretraining, 3 x 8 fine-tunes, ~150 merges
and their scores) must run in well under an hour on a shared 2-core CPU. The
architecture is LLaMA's (RMSNorm, rotary positions, SwiGLU MLP, untied
embeddings), so every tensor type a user's LLaMA merge meets is here.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
SIZES = {   # name -> LlamaConfig fields
    "toy": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2),
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Recipe:
    steps: int
    lr: float
    batch: int = 8
    warmup: float = 0.1
    weight_decay: float = 0.0
    lora_r: int = 0            # 0: full fine-tune
    lora_alpha: int = 16


def make_model(size: str, vocab: int, seq: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=seq, tie_word_embeddings=False,
                      attn_implementation="eager",  # faster than sdpa at this size on CPU
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, **SIZES[size])
    return LlamaForCausalLM(cfg)


def load(path: Path):
    """from_pretrained, refusing a checkpoint that misses weights (transformers
    would initialise them at random and we would score noise)."""
    from transformers import LlamaForCausalLM, logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model, info = LlamaForCausalLM.from_pretrained(str(path), output_loading_info=True,
                                                   attn_implementation="eager")
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise RuntimeError(f"{path}: checkpoint misses {sorted(info['missing_keys'])[:5]} / "
                           f"mismatched {info.get('mismatched_keys', [])[:5]}")
    return model.float().eval()


class Loader:
    """Loads many checkpoints of one architecture into one model object:
    safetensors straight into a strict load_state_dict, ~10x cheaper than a
    from_pretrained per checkpoint on this machine, and as strict (a missing,
    extra or misshapen tensor raises). The first load of an architecture goes
    through `load` (from_pretrained)."""

    def __init__(self):
        self.model = None
        self.config = None

    def load(self, path: Path):
        from safetensors.torch import load_file
        cfg = json.loads((Path(path) / "config.json").read_text())
        key = {k: cfg.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                       "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}
        if self.model is None or key != self.config:
            self.model, self.config = load(path), key
            return self.model
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise RuntimeError(f"{path}: no safetensors files")
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
        self.model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        return self.model.eval()


def train(model, params, data: torch.Tensor, r: Recipe, seed: int, tag: str) -> dict:
    """AdamW, linear warm-up then linear decay to 0, gradient clipping at 1."""
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay, betas=(0.9, 0.95))
    warm = max(1, int(r.warmup * r.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (r.steps - s) / (r.steps - warm)))
    rng = random.Random(f"{seed}:{tag}")
    order: list[int] = []
    losses = []
    model.train()
    t0 = time.time()
    for _ in range(r.steps):
        if len(order) < r.batch:
            idx = list(range(data.shape[0]))
            rng.shuffle(idx)
            order += idx
        rows, order = order[:r.batch], order[r.batch:]
        x = data[rows].long()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    k = max(1, min(10, len(losses)))
    return {"tag": tag, "recipe": asdict(r), "seconds": round(time.time() - t0, 1),
            "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}


def _save(model, tokenizer_dir: Path, out: Path, info: dict) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, tmp / name)
    (tmp / "train.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def pretrain(size: str, vocab: int, seq: int, data: torch.Tensor, r: Recipe, tokenizer_dir: Path,
             out: Path, seed: int = 0) -> dict:
    model = make_model(size, vocab, seq, seed)
    info = train(model, list(model.parameters()), data, r, seed, "pretrain")
    info["parameters"] = sum(p.numel() for p in model.parameters())
    _save(model, tokenizer_dir, out, info)
    return info


def finetune_full(base: Path, data: torch.Tensor, r: Recipe, out: Path, tag: str, seed: int = 0) -> dict:
    """Every tensor trains (embeddings and head too, as in a full LLM fine-tune)."""
    torch.manual_seed(seed)
    model = load(base)
    info = train(model, list(model.parameters()), data, r, seed, tag)
    _save(model, base, out, info)
    return info


def finetune_lora(base: Path, data: torch.Tensor, r: Recipe, adapter_out: Path, merged_out: Path,
                  tag: str, seed: int = 0) -> dict:
    """A peft LoRA adapter on every linear layer of the blocks; saved as the
    adapter (what a user merges) and merged to a full checkpoint with peft's
    merge_and_unload (the individual fine-tune's score, and the merge input
    where the product does not read adapters)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    model = get_peft_model(load(base), LoraConfig(r=r.lora_r, lora_alpha=r.lora_alpha, lora_dropout=0.0,
                                                  target_modules=LORA_TARGETS, init_lora_weights=True))
    params = [p for p in model.parameters() if p.requires_grad]
    info = train(model, params, data, r, seed, tag)
    info["trainable"] = sum(p.numel() for p in params)
    tmp = adapter_out.with_name(adapter_out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    cfg_path = tmp / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(cfg, indent=1))
    (tmp / "train.json").write_text(json.dumps(info, indent=1))
    merged = model.merge_and_unload()
    _save(merged, base, merged_out, info)
    shutil.rmtree(adapter_out, ignore_errors=True)
    tmp.rename(adapter_out)
    return info


@torch.inference_mode()
def seq_losses(model, data: torch.Tensor, batch: int = 20) -> list[float]:
    """Mean next-token NLL of each sequence (nats)."""
    out = []
    for i in range(0, data.shape[0], batch):
        x = data[i:i + batch].long()
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        out += nll.mean(1).tolist()
    return out
