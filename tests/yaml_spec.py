"""The expected merge, built from the YAML values themselves: README's config table and SPEC section 2
defaults spelled out here, never through the pipeline's config loader or `pipeline.plan.build_spec`.

The end-to-end tests compare the pipeline with `tadrop.reference` run on this spec, so a config value
that the pipeline drops or mangles on its way to the maths (a model weight, lambda, a TALL lambda, a
sparsifier parameter) changes the expected bytes and fails the test.
"""
from __future__ import annotations

import torch

from tadrop import DARE, Identity, MergeSpec, TADrop, TopK

# README "A config" and the config table; SPEC section 2 for lambda.
DEFAULT_LAMBDA = {"task_arithmetic": 0.3, "ties": 1.0}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sparsifier_from_yaml(method: str, sp: dict | None, seed: int = 0):
    if sp is None:
        sp = {"kind": "topk"} if method == "ties" else {"kind": "none"}
    kind = sp["kind"]
    if kind == "none":
        return Identity()
    if kind == "tadrop":
        return TADrop(a=float(sp.get("a", 0.5)), b=float(sp.get("b", 0.95)), eps=float(sp.get("eps", 1e-12)),
                      rescale=sp.get("rescale", "norm"), scope=sp.get("scope", "tensor"))
    if kind == "topk":
        return TopK(density=float(sp.get("density", 0.2)), scope=sp.get("scope", "tensor"))
    if kind == "dare":
        return DARE(p=float(sp["p"]), seed=int(seed))
    raise ValueError(f"unknown sparsify kind {kind!r}")


def spec_from_yaml(data: dict) -> MergeSpec:
    """The MergeSpec a YAML mapping (as written to the config file) asks for."""
    method = data.get("method", "task_arithmetic")
    names = tuple(m["name"] for m in data["models"])
    tall = data.get("tall", {})
    per_task = tall.get("lambdas", {})
    default_tall = tall.get("default_lambda", 0.4)
    cons = data.get("consensus", {})
    lam = data.get("lambda")
    seed = data.get("seed", 0)
    phi = sparsifier_from_yaml(method, data.get("sparsify"), seed)
    own_phis = None
    if any(m.get("sparsify") for m in data["models"]):   # models[].sparsify: that model's own parameters
        own = data.get("sparsify") or ({"kind": "topk"} if method == "ties" else {"kind": "none"})
        own_phis = tuple(sparsifier_from_yaml(method, {**own, **m["sparsify"]}, seed) if m.get("sparsify")
                         else phi for m in data["models"])
    return MergeSpec(
        method=method,
        sparsifier=phi,
        task_sparsifiers=own_phis,
        task_names=names,
        weights=tuple(float(m.get("weight", 1.0)) for m in data["models"]),
        lam=float(lam) if lam is not None else DEFAULT_LAMBDA.get(method, 0.3),
        emr_rescaler=data.get("emr", {}).get("rescaler", "official"),
        emr_tadrop=data.get("emr", {}).get("tadrop", "rescaled"),
        tall_lambdas=tuple(float(per_task.get(n, default_tall)) for n in names),
        tall_inner=tall.get("inner", "task_arithmetic"),
        consensus_k_min=int(cons.get("k_min", 2)),
        consensus_alpha=float(cons.get("alpha", 0.3)),
        consensus_inner=cons.get("inner", "task_arithmetic"),
        seed=int(data.get("seed", 0)),
    )


def out_dtype(data: dict, base: torch.Tensor) -> torch.dtype:
    """merged/ (and exports): output_dtype, else the base tensor's dtype."""
    return DTYPES[data["output_dtype"]] if data.get("output_dtype") else base.dtype


def unified_dtype(data: dict, base: torch.Tensor) -> torch.dtype:
    """unified/: unified_dtype, else as merged/."""
    return DTYPES[data["unified_dtype"]] if data.get("unified_dtype") else out_dtype(data, base)
