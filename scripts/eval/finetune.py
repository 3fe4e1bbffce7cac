"""Fine-tunes one checkpoint per task against its fixed zero-shot head.

Recipe (the brief's): everything but the word-embedding matrix trains, AdamW
lr 1e-4, weight decay 0.01, 120 steps of batch 32, 10% warm-up then linear
decay, 32 tokens, one torch thread. Word embeddings stay frozen so that the
merge can pass them through (and a tiny vocab-sized task vector of zeros is
not what we want to benchmark). Run it under `nice -n 10`: it shares 2 cores.

    python3 scripts/eval/finetune.py --data eval_data [--tasks a,b] [--force]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import encoder
from tasks import TASKS

STEPS, BATCH, LR, WD, WARMUP = 120, 32, 1e-4, 0.01, 0.1


def finetune(task: dict, out: Path, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = encoder.load_model()
    encoder.head(task)   # compute the fixed head before the weights move
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    warm = int(WARMUP * STEPS)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (STEPS - s) / (STEPS - warm)))
    rows = list(task["splits"]["train"])
    rng = random.Random(f"{seed}:{task['task']}")
    order: list = []
    model.train()
    t0, losses = time.time(), []
    for step in range(STEPS):
        if len(order) < BATCH:
            rng.shuffle(rows)
            order += rows
        batch, order = order[:BATCH], order[BATCH:]
        emb = encoder.embed(model, [t for t, _ in batch])
        loss = torch.nn.functional.cross_entropy(encoder.logits(emb, task),
                                                 torch.tensor([y for _, y in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    encoder.tokenizer().save_pretrained(str(tmp))
    info = {"task": task["task"], "steps": STEPS, "seconds": round(time.time() - t0, 1),
            "loss_first10": sum(losses[:10]) / 10, "loss_last10": sum(losses[-10:]) / 10}
    (tmp / "finetune.json").write_text(json.dumps(info, indent=1))
    tmp.rename(out)
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("eval_data"))
    ap.add_argument("--tasks", default=",".join(t.name for t in TASKS))
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name in a.tasks.split(","):
        out = a.data / "models" / name
        if out.exists() and not a.force:
            print(f"{name}: exists, skipped", flush=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        info = finetune(encoder.load_task(a.data, name), out)
        print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
