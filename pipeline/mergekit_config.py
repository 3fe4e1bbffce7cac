"""mergekit YAML configs (`mergekit-yaml`) translated into tadrop configs, exactly or not at all.

The methods both tools have: task_arithmetic, ties, dare_ties, dare_linear, linear, with mergekit's
semantics (arcee-ai/mergekit, mergekit/merge_methods/generalized_task_arithmetic.py, GTATask.execute,
and registry.py for each method's defaults: ties normalize=True, dare_* rescale=True, density 1.0,
lambda 1.0; linear.py: normalize=True):
  task_arithmetic  base + lambda * sum_k w_k tau_k            (/ sum_k w_k with normalize)
  dare_linear      the same with DARE(keep = density, rescaled) on each tau_k
  ties / dare_ties base + lambda * sum_k w_k tau'_k m_k / sum_k w_k m_k   (normalize; m_k: sign agrees)
  linear           sum_k w_k theta_k / sum_k w_k
Anything whose result would differ from mergekit's (other methods, slices, gradients or filtered
parameters, ties without normalize or with unequal weights...) is named and refused, not guessed.
DARE's random stream is ours (seeded per tensor and task), so a dare_* merge matches mergekit in
distribution, not bit for bit.
`tokenizer_source` (or a `tokenizer:` block's `source`): base, union or a merged model's path become
tadrop's tokenizer_source base, union or that model's name (the same rows: mergekit's
tokenizer/embed.py); per-token sources, padding and a tokenizer of a model outside the merge are refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import yaml

from .config import ConfigError

METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "linear")
# mergekit's per-method defaults (registry.py / linear.py)
_NORMALIZE = {"task_arithmetic": False, "ties": True, "dare_ties": False, "dare_linear": False, "linear": True}
_HARMLESS_TOP = {"dtype": "the computation dtype (tadrop computes in float32, sums in float64)",
                 "name": "a label"}
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "name",
             "tokenizer_source", "tokenizer", "chat_template", "slices", "modules"}


def is_mergekit(data: dict) -> bool:
    """A mergekit config has `merge_method` (ours has `method`)."""
    return isinstance(data, dict) and "merge_method" in data


@dataclass
class Translation:
    config: dict                                   # the tadrop config (a plain dict, YAML-ready)
    notes: list[str] = field(default_factory=list)   # exact but worth knowing

    def yaml(self, source: str) -> str:
        head = f"# tadrop config translated from the mergekit config {source}\n"
        notes = "".join(f"# note: {n}\n" for n in self.notes)
        return head + notes + yaml.safe_dump(self.config, sort_keys=False, default_flow_style=None)


def _ref(m: Any, where: str, bad: list[str]) -> str | None:
    """A model reference: a path or hub id (`model: x`); LoRA suffixes are not translated."""
    if isinstance(m, dict):
        m = m.get("model", m)
        if isinstance(m, dict):
            if m.get("lora"):
                bad.append(f"{where}: a model with a LoRA adapter (`lora:`)")
            m = m.get("path", m.get("model"))
    if not isinstance(m, str):
        bad.append(f"{where}: expected a model path or hub id, got {m!r}")
        return None
    if "+" in m:
        bad.append(f"{where}: {m!r} applies a LoRA (`model+lora`)")
    return m


def _scalar(v: Any, where: str, bad: list[str]) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, Real):
        bad.append(f"{where}: {v!r} is a gradient or a filtered parameter (tadrop takes one number per model)")
        return None
    return float(v)


def translate(data: dict, source: str = "mergekit config") -> Translation:
    """The tadrop config for a mergekit config; ConfigError naming everything that cannot be."""
    bad: list[str] = []
    notes: list[str] = []
    method = data.get("merge_method")
    if method not in METHODS:
        raise ConfigError(f"{source}: merge_method: {method!r} has no tadrop counterpart; translatable: "
                          f"{', '.join(METHODS)} (tadrop's own: task_arithmetic, ties, emr, tall_masks, consensus)")
    for k in sorted(set(data) - _TOP_KEYS):
        bad.append(f"{k}: unknown mergekit key")
    if data.get("slices") is not None:
        bad.append("slices: layer slicing (tadrop merges whole models: use `models:`)")
    if data.get("modules") is not None:
        bad.append("modules: per-module configs")
    tokenizer = _tokenizer_source(data, bad)
    if data.get("chat_template") is not None:
        bad.append("chat_template (tadrop copies the base's files unchanged)")
    for k in _HARMLESS_TOP:
        if k in data and k != "name":
            notes.append(f"{k}: {_HARMLESS_TOP[k]}")
    params = dict(data.get("parameters") or {})
    normalize = params.pop("normalize", _NORMALIZE[method])
    rescale = params.pop("rescale", method.startswith("dare"))
    params.pop("int8_mask", None)                      # memory layout only: same result
    lam = _scalar(params.pop("lambda", 1.0), "parameters.lambda", bad)
    top_w = _scalar(params.pop("weight", None), "parameters.weight", bad)
    top_d = _scalar(params.pop("density", None), "parameters.density", bad)
    for k in params:
        bad.append(f"parameters.{k}: not a parameter of mergekit's {method} that tadrop has")

    models = data.get("models") or []
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{source}: models: a list of models is required")
    base = data.get("base_model")
    base = _ref(base, "base_model", bad) if base is not None else None
    if base is None and method != "linear":
        bad.append(f"base_model: required by {method}")
    entries = []   # (ref, weight, density)
    base_weight = 0.0
    for i, m in enumerate(models):
        ref = _ref(m, f"models.{i}.model", bad)
        p = dict((m.get("parameters") if isinstance(m, dict) else None) or {})
        w = _scalar(p.pop("weight", top_w), f"models.{i}.parameters.weight", bad)
        d = _scalar(p.pop("density", top_d), f"models.{i}.parameters.density", bad)
        for k in p:
            bad.append(f"models.{i}.parameters.{k}: not translatable")
        w = 1.0 if w is None else w
        if ref is not None and ref == base:
            base_weight = w                       # the base's own row: tau = 0, weight counts for linear
            continue
        entries.append((ref, w, d))
    if method == "linear" and base is None and entries:
        base, base_weight = entries[0][0], entries[0][1]
        entries = entries[1:]
        notes.append(f"base: {base} (linear has no base model; the first model is the base: exact, "
                     "its task vector is zero)")
    if not entries:
        bad.append("models: nothing to merge besides the base model")
    tok_choice = _tokenizer_choice(tokenizer, base, [ref for ref, _, _ in entries], bad)
    if tok_choice == "union":
        notes.append("tokenizer_source: union: a token the base lacks gets mergekit's row (the mean of the "
                     "models that have it; a model without it has tau = 0); tadrop keeps the models' token "
                     "ids, which must agree (else an error names the first that differs)")
    if bad:
        raise ConfigError(f"{source}: cannot translate this mergekit config to tadrop:\n  " + "\n  ".join(bad))

    weights = [w for _, w, _ in entries]
    cfg: dict[str, Any] = {"base": base}
    sparsify = None
    per_model: list[dict | None] = [None] * len(entries)
    if method in ("ties", "dare_ties", "dare_linear"):
        dens = [1.0 if d is None else d for _, _, d in entries]
        if method == "ties":
            if rescale:
                raise ConfigError(f"{source}: cannot translate: parameters.rescale: true for ties "
                                  "(tadrop's top-k trim never rescales)")
            sparsify = {"kind": "topk", "density": dens[0], "scope": "tensor"}
            notes.append("top-k keeps ties at the boundary and at least one entry per tensor "
                         "(mergekit keeps exactly int(density * n)): the same on real weights")
            per_model = [None if d == dens[0] else {"density": d} for d in dens]
        else:
            if not rescale:
                raise ConfigError(f"{source}: cannot translate: parameters.rescale: false (tadrop's DARE "
                                  "always divides the survivors by the keep rate)")
            sparsify = {"kind": "dare", "p": round(1.0 - dens[0], 12)}
            per_model = [None if d == dens[0] else {"p": round(1.0 - d, 12)} for d in dens]
            notes.append("DARE draws its own seeded random stream: the same distribution as mergekit's, "
                         "not the same bits")
    if method in ("ties", "dare_ties"):
        if not normalize:
            raise ConfigError(f"{source}: cannot translate: {method} with normalize: false (mergekit sums "
                              "the agreeing task vectors; tadrop's TIES takes their mean): set "
                              "`parameters: {normalize: true}` with equal weights")
        if len(set(weights)) > 1:
            raise ConfigError(f"{source}: cannot translate: {method} with unequal weights {weights} "
                              "(mergekit divides by the sum of the agreeing weights, tadrop's TIES by their "
                              "count): give every model the same weight")
        cfg.update(method="ties", sparsify=sparsify, **{"lambda": lam})
        weights = [1.0] * len(entries)          # equal weights cancel in mergekit's weighted mean
    else:
        total = sum(weights) + base_weight
        if method == "linear":
            if not normalize and abs(total - 1.0) > 1e-12:
                raise ConfigError(f"{source}: cannot translate: linear with normalize: false and weights "
                                  f"summing to {total} (the base would carry weight {1 - total + base_weight})")
            weights = [w / total for w in weights]
            lam = 1.0
        elif normalize:
            if abs(total) < 1e-8:
                raise ConfigError(f"{source}: cannot translate: normalize with weights summing to 0")
            weights = [w / total for w in weights]
        cfg.update(method="task_arithmetic", **({"sparsify": sparsify} if sparsify else {}), **{"lambda": lam})
    cfg["models"] = []
    used = set()
    for i, ((ref, _, _), w, pm) in enumerate(zip(entries, weights, per_model)):
        entry = {"name": _task_name(ref, i, used), "path": ref, "weight": w}
        if pm:
            entry["sparsify"] = pm
        cfg["models"].append(entry)
    if tok_choice is not None and tok_choice != "base":
        cfg["tokenizer_source"] = tok_choice if tok_choice == "union" else cfg["models"][tok_choice]["name"]
    if data.get("out_dtype") is not None:
        cfg["output_dtype"] = str(data["out_dtype"])
    elif data.get("dtype") is not None:
        cfg["output_dtype"] = str(data["dtype"])        # mergekit writes its computation dtype
    return Translation(cfg, notes)


def _tokenizer_source(data: dict, bad: list[str]) -> Any:
    """mergekit's output vocabulary: `tokenizer_source`, or the `source` of a `tokenizer:` block (whose
    default is union); None when neither is given."""
    source, block = data.get("tokenizer_source"), data.get("tokenizer")
    if block is None:
        return source
    if source is not None:
        bad.append("tokenizer, tokenizer_source: both given (mergekit takes one or the other)")
        return None
    if not isinstance(block, dict):
        bad.append(f"tokenizer: expected a mapping with `source`, got {block!r}")
        return None
    for k in sorted(set(block) - {"source"}):
        if block[k] in (None, {}, []):
            continue
        bad.append(f"tokenizer.{k}: " + {
            "tokens": "per-token embedding sources (tadrop gives a token the base lacks the mean of the "
                      "rows of the models that have it)",
            "pad_to_multiple_of": "vocabulary padding (tadrop's output has exactly the chosen vocabulary's rows)",
        }.get(k, "unknown key of mergekit's tokenizer block"))
    return block.get("source", "union")


def _tokenizer_choice(source: Any, base: str | None, refs: list, bad: list[str]) -> Any:
    """mergekit's tokenizer source as tadrop's: None or "base" (the default), "union", or the index of
    the merged model whose vocabulary it is. The meaning is the same: the output has that vocabulary;
    a token the base lacks is the one model's row that has it or the mean of the rows of those that
    have it, a model without it contributes nothing (mergekit's tokenizer/embed.py, PermutedEmbeddings)."""
    if source is None or source == "base" or source == "union":
        return source
    ref = _ref(source, "tokenizer_source", bad)
    if ref is None:
        return None
    if ref == base:
        return "base"
    if ref in refs:
        return refs.index(ref)
    bad.append(f"tokenizer_source: {ref!r} is not one of the merged models (tadrop's tokenizer_source is "
               "base, union or the name of a merged model)")
    return None


def _task_name(ref: str, i: int, used: set) -> str:
    import re
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", ref.rstrip("/").rsplit("/", 1)[-1]).strip("-.") or f"model{i}"
    if not stem[0].isalnum():
        stem = f"m{stem}"
    name, n = stem, 2
    while name in used or name == "base":
        name, n = f"{stem}-{n}", n + 1
    used.add(name)
    return name
