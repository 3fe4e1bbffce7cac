"""Extended vocabularies (SPEC section 5): fine-tunes whose embeddings / output head have more rows
than the base's V0 (transformers' resize_token_embeddings after adding tokens).

`tokenizer_source` (mergekit's key and values: base | union | a model's name) picks the output
vocabulary. With `base` the extra rows are dropped (a warning counts them). Otherwise the output has
V rows; row i >= V0 of the base is the mean of the rows i of the models that have it, and a model
without row i has tau = 0 there. Token ids must mean the same token in every tokenizer that has them;
the first id that differs is named in the error.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints import CheckpointError
from .rows import is_adapter

log = logging.getLogger("tadrop")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")


class VocabError(CheckpointError):
    """Vocabularies that cannot be merged; names the model, tensor or token id."""


@dataclass(frozen=True)
class Vocab:
    source: str                              # base | union | a model's name
    v0: int                                  # the base's rows
    size: int                                # the output's rows
    rows: dict = field(default_factory=dict)  # tensor -> tuple of each model's rows (adapters: v0)
    tokenizer_dir: Path | None = None        # where the output's tokenizer files come from

    def shape(self, name: str, base_shape: tuple) -> tuple:
        return (self.size, *base_shape[1:]) if name in self.rows else tuple(base_shape)

    @property
    def extended(self) -> bool:
        return self.size != self.v0

    def write_files(self, out_dir: Path) -> None:
        """The chosen tokenizer's files and config.json's vocab_size into a written checkpoint."""
        if self.tokenizer_dir is not None:
            for f in TOKENIZER_FILES:
                src = self.tokenizer_dir / f
                if src.is_file():
                    shutil.copy2(src, out_dir / f)
        cfg = out_dir / "config.json"
        if self.extended and cfg.is_file():
            data = json.loads(cfg.read_text())
            for holder in (data, data.get("text_config")):
                if isinstance(holder, dict) and "vocab_size" in holder:
                    holder["vocab_size"] = self.size
            cfg.write_text(json.dumps(data, indent=2) + "\n")


def token_map(d: Path) -> dict[int, str] | None:
    """id -> token of the tokenizer in `d` (tokenizer.json, else vocab.json / vocab.txt), with its
    added tokens; None when the directory has no tokenizer we can read."""
    ids: dict[int, str] = {}
    tj = d / "tokenizer.json"
    try:
        if tj.is_file():
            data = json.loads(tj.read_text())
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):
                ids.update({int(i): t for t, i in vocab.items()})
            elif isinstance(vocab, list):     # Unigram: [[piece, score], ...]
                ids.update({i: p[0] for i, p in enumerate(vocab)})
            for t in data.get("added_tokens") or []:
                ids[int(t["id"])] = t["content"]
            return ids
        if (d / "vocab.json").is_file():
            ids.update({int(i): t for t, i in json.loads((d / "vocab.json").read_text()).items()})
        elif (d / "vocab.txt").is_file():
            ids.update(enumerate((d / "vocab.txt").read_text(encoding="utf-8").splitlines()))
        else:
            return None
        if (d / "added_tokens.json").is_file():
            ids.update({int(i): t for t, i in json.loads((d / "added_tokens.json").read_text()).items()})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VocabError(f"{d}: unreadable tokenizer ({type(e).__name__}: {e})") from None
    return ids


def _check_tokens(named: list[tuple[str, Path, int]], upto: int) -> None:
    """Every id < upto that two tokenizers both have must be the same token in both."""
    maps = [(n, token_map(p), rows) for n, p, rows in named]
    readable = [(n, m, rows) for n, m, rows in maps if m is not None]
    missing = [n for n, m, _ in maps if m is None]
    if missing and len(readable) < len(maps):
        log.warning("no readable tokenizer in %s: their token ids could not be checked", ", ".join(missing))
    first: tuple[int, str, str, str, str] | None = None
    for i, (n1, m1, r1) in enumerate(readable):
        for n2, m2, r2 in readable[i + 1:]:
            lim = min(upto, r1, r2)
            for tid in sorted(t for t in m1 if t < lim and t in m2 and m1[t] != m2[t])[:1]:
                if first is None or tid < first[0]:
                    first = (tid, n1, m1[tid], n2, m2[tid])
    if first:
        tid, n1, t1, n2, t2 = first
        raise VocabError(f"tokenizers differ: token id {tid} is {t1!r} in {n1} but {t2!r} in {n2} (the first "
                         "differing id); merging rows of different tokens is meaningless")


def plan_vocab(cfg, base, models: list) -> Vocab | None:
    """The output vocabulary, or None when every model has the base's rows and tokenizer_source is base."""
    source = getattr(cfg, "tokenizer_source", "base") or "base"
    ext: dict[str, dict[str, int]] = {}       # model -> tensor -> rows
    for m in models:
        if is_adapter(m):       # bound adapters: the saved full tensors with more rows (sources.lora)
            if getattr(m, "ext_rows", None):
                ext[m.name] = dict(m.ext_rows)
            continue
        for name, b in base.tensors.items():
            t = m.tensors.get(name)
            if (t is not None and len(b.shape) >= 1 and len(t.shape) == len(b.shape)
                    and t.shape[1:] == b.shape[1:] and t.shape[0] > b.shape[0] and b.is_float):
                ext.setdefault(m.name, {})[name] = t.shape[0]
    if not ext and source == "base":
        return None
    names = sorted({n for d in ext.values() for n in d})
    v0s = {base.tensors[n].shape[0] for n in names}
    if len(v0s) > 1:
        raise VocabError(f"the base's vocabulary tensors {names} have different row counts {sorted(v0s)}")
    v0 = v0s.pop() if v0s else None
    for mname, d in ext.items():
        if len(set(d.values())) > 1:
            raise VocabError(f"model {mname!r}: vocabulary tensors have different row counts "
                             f"({', '.join(f'{n} {r}' for n, r in sorted(d.items()))})")
        lacking = [n for n in names if n not in d]
        if lacking:
            kind = "adapter" if is_adapter(next(m for m in models if m.name == mname)) else "model"
            raise VocabError(f"{kind} {mname!r}: {', '.join(d)} extended to {max(d.values())} rows but "
                             f"{', '.join(lacking)} not")
    if v0 is None:    # a named tokenizer_source but nothing extended: the base's vocabulary
        return None
    mrows = {m.name: (next(iter(ext[m.name].values())) if m.name in ext else v0) for m in models}
    def has_tokenizer(m) -> bool:    # a full fine-tune's directory always counts (as before)
        return not is_adapter(m) or any((m.root / f).is_file() for f in
                                        ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model"))

    if source == "base":
        size, tok_dir = v0, None
    elif source == "union":
        size = max(mrows.values())
        tok_dir = next((m.root for m in models if mrows[m.name] == size and has_tokenizer(m)), None)
    else:
        m = next(m for m in models if m.name == source)
        size, tok_dir = mrows[source], (m.root if has_tokenizer(m) else None)
    if size > v0 and tok_dir is None:
        log.warning("tokenizer_source %s: no model with the output's %d-row vocabulary has tokenizer files; "
                    "the base's tokenizer (%d rows) is written", source, size, v0)
    dropped = {n: r - size for n, r in mrows.items() if r > size}
    if dropped:
        log.warning("tokenizer_source %s: %d vocabulary row(s) beyond the output's %d dropped (%s)", source,
                    sum(dropped.values()), size, ", ".join(f"{n}: {r}" for n, r in sorted(dropped.items())))
    named = [("the base", base.root, v0)] + [
        (f"{'adapter' if is_adapter(m) else 'model'} {m.name!r}", m.root, mrows[m.name]) for m in models
        if not is_adapter(m) or (has_tokenizer(m) or m.name in ext)]
    _check_tokens(named, size)
    rows = {n: tuple(mrows[m.name] for m in models) for n in names}
    return Vocab(source, v0, size, rows, tok_dir)
