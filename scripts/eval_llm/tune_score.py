"""The validation score `tadrop tune` calls for TALL's per-domain lambda_k in the LLM benchmark:
minus the held-out loss (mean over the domain's validation sequences of each sequence's mean
next-token NLL, the same number every other hyperparameter is chosen on), so higher is better.

bench.py passes it to `pipeline.tune.tune` in process; the same from the CLI:
`TADROP_EVAL_LLM_WORK=WORK PYTHONPATH=scripts/eval_llm tadrop tune RUN --grid 0.2,0.3,0.4,0.5,0.6
--score tune_score:val_neg_loss --model-class LlamaForCausalLM`."""
from __future__ import annotations

import os
from pathlib import Path

import torch

import lm

_TOKENS: dict[str, dict] = {}


def val_tokens(work: Path) -> dict:
    key = str(Path(work).resolve())
    if key not in _TOKENS:
        _TOKENS[key] = torch.load(Path(key) / "data" / "tokens.pt")
    return _TOKENS[key]


def val_neg_loss(task: str, model) -> float:
    data = val_tokens(Path(os.environ["TADROP_EVAL_LLM_WORK"]))[f"{task}/val"]
    losses = lm.seq_losses(model.float().eval(), data)
    return -sum(losses) / len(losses)
