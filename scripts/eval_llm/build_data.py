"""Builds the frozen LLM benchmark data: per-domain document splits, a byte-level
BPE tokenizer trained on the pretraining text, and fixed-length token sequences;
checks the texts and the tokenizer against the committed hash manifest.

Why a manifest: the documents come from whatever package versions are
installed, and the tokenizer from whatever `tokenizers` version trains it, so
the same code elsewhere can give a different benchmark. The SHA-256 of each
domain's splits and of tokenizer.json turn that drift into an error.

Splits are by document (a file, or a page of one): a document lands in
exactly one of test / val / pretrain / train, so held-out loss is measured on
files neither the base nor any fine-tune has seen.

    python3 scripts/eval_llm/build_data.py [--out eval_llm_data] [--update-manifest]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

import corpora

sys.path.append(str(Path(__file__).resolve().parents[1]))
from eval_common import apt_versions, canonical, sha256  # noqa: E402  (shared with scripts/eval)

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
SEED = 0
SEQ = 128                  # tokens per sequence
VOCAB = 2048
EOS = "<|endoftext|>"
# Character budgets per domain (in that order: a document goes to the first
# split not yet full). About 3.5 characters make a token here.
TEST_CHARS, VAL_CHARS, PRE_CHARS, TRAIN_CHARS = 24_000, 8_000, 30_000, 400_000
GENERAL_CHARS = 600_000    # package descriptions in the pretraining mix
N_TEST, N_VAL = 40, 10     # sequences scored per domain
APT_PACKAGES = ["fortunes", "wordnet-base", "manpages", "manpages-dev", "libc6-dev",
                "linux-libc-dev", "perl-modules-5.36", "libpython3.11-stdlib", "base-files"]


def split_docs(docs: list[str], name: str, seed: int = SEED) -> dict[str, list[str]]:
    order = list(docs)
    random.Random(f"{seed}:{name}").shuffle(order)
    budgets = [("test", TEST_CHARS), ("val", VAL_CHARS), ("pretrain", PRE_CHARS), ("train", TRAIN_CHARS)]
    out: dict[str, list[str]] = {k: [] for k, _ in budgets}
    used = {k: 0 for k, _ in budgets}
    i = 0
    for key, budget in budgets:
        while i < len(order) and used[key] < budget:
            out[key].append(order[i])
            used[key] += len(order[i])
            i += 1
    if used["train"] < TRAIN_CHARS // 4:
        raise SystemExit(f"domain {name}: only {used['train']} training characters; missing package?")
    return out


def train_tokenizer(texts: list[str], out: Path) -> Path:
    """Byte-level BPE (GPT-2 style) on the pretraining text only; saved as a
    transformers fast tokenizer so every checkpoint carries it."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=VOCAB, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS, pad_token=EOS, model_max_length=1 << 30)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out / "tokenizer.json"


def pack(texts: list[str], tok, n_max: int | None = None) -> torch.Tensor:
    """Documents joined by EOS and cut into SEQ-token rows (the tail is dropped)."""
    eos = tok.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [eos]
        if n_max is not None and len(ids) >= n_max * SEQ:
            break
    n = len(ids) // SEQ if n_max is None else min(n_max, len(ids) // SEQ)
    return torch.tensor(ids[:n * SEQ], dtype=torch.int16).view(n, SEQ)


def versions() -> dict[str, str]:
    out = apt_versions(APT_PACKAGES)
    import tokenizers
    out["pypi:tokenizers"] = tokenizers.__version__
    return out


def build(out_dir: Path, update_manifest: bool = False, strict: bool = True) -> dict:
    from transformers import PreTrainedTokenizerFast
    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    (out_dir / ".gitignore").write_text("*\n")     # git never sees data or checkpoints
    entries, splits = {}, {}
    for name, reader in corpora.DOMAINS.items():
        splits[name] = split_docs(reader(), name)
        blob = canonical(splits[name])
        entries[name] = {"sha256": sha256(blob),
                         **{k: sum(map(len, v)) for k, v in splits[name].items()}}
    general = list(corpora.general())
    random.Random(f"{SEED}:general").shuffle(general)
    gen, n = [], 0
    for d in general:
        if n >= GENERAL_CHARS:
            break
        gen.append(d)
        n += len(d)
    entries["general"] = {"sha256": sha256(canonical(gen)), "pretrain": n}
    (data / "texts.json").write_bytes(canonical({"domains": splits, "general": gen}))

    pre_texts = gen + [d for s in splits.values() for d in s["pretrain"]]
    random.Random(f"{SEED}:pretrain").shuffle(pre_texts)
    tok_json = train_tokenizer(pre_texts, out_dir / "tokenizer")
    tok = PreTrainedTokenizerFast.from_pretrained(str(out_dir / "tokenizer"))
    tokens = {"pretrain": pack(pre_texts, tok)}
    for name, s in splits.items():
        tokens[f"{name}/train"] = pack(s["train"], tok)
        tokens[f"{name}/val"] = pack(s["val"], tok, N_VAL)
        tokens[f"{name}/test"] = pack(s["test"], tok, N_TEST)
        for k, want in (("val", N_VAL), ("test", N_TEST)):
            if tokens[f"{name}/{k}"].shape[0] < want:
                raise SystemExit(f"domain {name}: {k} split gives fewer than {want} sequences")
    torch.save(tokens, data / "tokens.pt")
    manifest = {"seed": SEED, "seq": SEQ, "vocab": VOCAB, "domains": entries,
                "tokenizer_sha256": sha256(tok_json.read_bytes()),
                "sequences": {k: int(v.shape[0]) for k, v in tokens.items()},
                "packages": versions()}
    for name, e in entries.items():
        print(f"{name:12s} " + " ".join(f"{k}={v}" for k, v in e.items() if k != "sha256"), flush=True)
    return _check(manifest, out_dir, update_manifest, strict)


def _check(manifest: dict, out_dir: Path, update: bool, strict: bool, path: Path = MANIFEST) -> dict:
    if update or not path.exists():
        path.write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"wrote {path}")
        manifest["matches_manifest"] = True
    else:
        bad = differences(json.loads(path.read_text()), manifest)
        if bad:
            msg = f"data differs from {path.name}: {'; '.join(bad)}"
            if strict:
                raise SystemExit(msg + "\n(--no-strict to go on anyway; the results then say so)")
            print("WARNING: " + msg, file=sys.stderr)
        else:
            print("data matches manifest")
        manifest["matches_manifest"] = not bad
    (out_dir / "data_check.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def differences(want: dict, got: dict) -> list[str]:
    """What makes the built data differ from the manifest, one phrase each."""
    bad = [f"domain {n}" for n, e in got["domains"].items()
           if want.get("domains", {}).get(n, {}).get("sha256") != e["sha256"]]
    bad += [f"domain {n} missing" for n in want.get("domains", {}) if n not in got["domains"]]
    if want.get("tokenizer_sha256") != got["tokenizer_sha256"]:
        bad.append("tokenizer.json")
    if bad:
        vers = {k: (v, got["packages"].get(k)) for k, v in want.get("packages", {}).items()
                if got["packages"].get(k) != v}
        bad.append(f"package versions that differ: {vers or 'none'}")
    return bad


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("eval_llm_data"))
    ap.add_argument("--update-manifest", action="store_true")
    ap.add_argument("--no-strict", action="store_true")
    a = ap.parse_args(argv)
    build(a.out, a.update_manifest, strict=not a.no_strict)


if __name__ == "__main__":
    main()
