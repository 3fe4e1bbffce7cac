"""mergekit YAML configs: translated exactly (checked against mergekit's formulas, written out here from
arcee-ai/mergekit generalized_task_arithmetic.py / linear.py), printed before running, and anything
untranslatable named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.config import ConfigError
from pipeline.mergekit_config import translate

from conftest import run_cli
from test_pipeline_e2e import load_dir


def _sd(path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def mk_ties(base, tasks, weights, densities, lam=1.0):
    """mergekit ties (normalize: true): magnitude top-k per tensor, sum-sign consensus, weighted mean."""
    out = {}
    for name, t0 in base.items():
        deltas = []
        for sd, d in zip(tasks, densities):
            tau = sd[name].float() - t0.float()
            k = int(d * tau.numel())
            if d < 1:
                keep = torch.zeros(tau.numel(), dtype=torch.bool)
                keep[torch.topk(tau.abs().reshape(-1), k).indices] = True
                tau = tau * keep.reshape(tau.shape)
            deltas.append(tau)
        deltas = torch.stack(deltas)
        w = torch.tensor(weights).reshape(-1, *([1] * t0.dim()))
        wd = deltas * w
        sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        mask = wd.sign() == sign
        div = (w * mask).sum(0)
        div[div == 0] = 1
        out[name] = t0.float() + lam * (wd * mask).sum(0) / div
    return out


def mk_linear(models, weights):
    return {n: sum(w * sd[n].float() for sd, w in zip(models, weights)) / sum(weights) for n in models[0]}


def mk_task_arithmetic(base, tasks, weights, lam, normalize):
    div = sum(weights) if normalize else 1.0
    return {n: t0.float() + lam * sum(w * (sd[n].float() - t0.float()) for sd, w in zip(tasks, weights)) / div
            for n, t0 in base.items()}


def _write(tmp_path, d) -> Path:
    p = tmp_path / "mergekit.yml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def _run(tmp_path, d):
    proc = run_cli("merge", _write(tmp_path, d), tmp_path / "run", "--quiet", check=True)
    printed = yaml.safe_load(proc.stdout)            # the equivalent tadrop config, printed first
    return printed, load_dir(tmp_path / "run" / "merged")


def _close(got, want):
    for name, w in want.items():
        torch.testing.assert_close(got[name].float(), w, rtol=2e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


def test_ties_with_per_model_density(tmp_path, family):
    names = ["task0", "task1", "task2"]
    d = {"merge_method": "ties", "base_model": str(family["base"]), "dtype": "float32",
         "parameters": {"normalize": True, "lambda": 0.9},
         "models": [{"model": str(family["base"])}]
         + [{"model": str(family[n]), "parameters": {"weight": 0.5, "density": dd}}
            for n, dd in zip(names, (0.3, 0.6, 0.9))]}
    printed, got = _run(tmp_path, d)
    assert printed["method"] == "ties" and printed["sparsify"]["kind"] == "topk"
    assert [m.get("sparsify") for m in printed["models"]] == [None, {"density": 0.6}, {"density": 0.9}]
    want = mk_ties(_sd(family["base"]), [_sd(family[n]) for n in names], [0.5] * 3, [0.3, 0.6, 0.9], lam=0.9)
    _close(got, want)


def test_linear_and_task_arithmetic(tmp_path, family):
    names = ["task0", "task1", "task2"]
    lin = {"merge_method": "linear", "models": [{"model": str(family[n]), "parameters": {"weight": w}}
                                                for n, w in zip(names, (0.2, 0.5, 0.3))]}
    (tmp_path / "lin").mkdir()
    _, got = _run(tmp_path / "lin", lin)
    _close(got, mk_linear([_sd(family[n]) for n in names], [0.2, 0.5, 0.3]))
    ta = {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
          "parameters": {"normalize": True, "lambda": 0.7},
          "models": [{"model": str(family[n]), "parameters": {"weight": w}} for n, w in zip(names, (1.0, 2.0, 1.0))]}
    (tmp_path / "ta").mkdir()
    printed, got = _run(tmp_path / "ta", ta)
    assert [m["weight"] for m in printed["models"]] == [0.25, 0.5, 0.25] and printed["lambda"] == 0.7
    _close(got, mk_task_arithmetic(_sd(family["base"]), [_sd(family[n]) for n in names], [1.0, 2.0, 1.0], 0.7, True))


def test_dare_translates_density_to_p_per_model(family):
    d = {"merge_method": "dare_linear", "base_model": "b", "parameters": {"density": 0.4},
         "models": [{"model": "x/m1", "parameters": {"weight": 0.5}},
                    {"model": "x/m2", "parameters": {"weight": 0.5, "density": 0.9}}]}
    t = translate(d).config
    assert t["method"] == "task_arithmetic" and t["sparsify"] == {"kind": "dare", "p": 0.6}
    assert [m.get("sparsify") for m in t["models"]] == [None, {"p": 0.1}]
    assert [m["name"] for m in t["models"]] == ["m1", "m2"] and t["lambda"] == 1.0
    dt = translate({**d, "merge_method": "dare_ties", "parameters": {"density": 0.4, "normalize": True}}).config
    assert dt["method"] == "ties" and dt["sparsify"]["kind"] == "dare"


@pytest.mark.parametrize("mk,ours", [
    ({}, None),                                            # mergekit's default: no vocabulary merge
    ({"tokenizer_source": "base"}, None),                  # ours' default: not written out
    ({"tokenizer_source": "x/b"}, None),                   # the base model's path is `base`
    ({"tokenizer_source": "union"}, "union"),
    ({"tokenizer_source": "y/m2"}, "m2"),                  # a merged model's path: its task name
    ({"tokenizer_source": {"model": "x/m1"}}, "m1"),
    ({"tokenizer": {"source": "y/m2"}}, "m2"),
    ({"tokenizer": {}}, "union"),                          # the block's default source is union
    ({"tokenizer": {"source": "base", "tokens": {}}}, None),
])
def test_tokenizer_source_translates(mk, ours):
    d = {"merge_method": "task_arithmetic", "base_model": "x/b", **mk,
         "models": [{"model": "x/m1"}, {"model": "y/m2"}]}
    t = translate(d)
    assert t.config.get("tokenizer_source") == ours
    assert ("tokenizer_source" in t.config) == (ours is not None)
    if ours == "union":
        assert any("union" in n for n in t.notes)
    lin = translate({"merge_method": "linear", "tokenizer_source": "x/m1",      # linear: the first model is
                     "models": [{"model": "x/m1"}, {"model": "y/m2"}]}).config  # the base
    assert lin["base"] == "x/m1" and "tokenizer_source" not in lin


@pytest.mark.parametrize("change,named", [
    ({"merge_method": "slerp"}, "merge_method: 'slerp' has no tadrop counterpart"),
    ({"slices": [{"sources": []}]}, "slices: layer slicing"),
    ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "a"}}}}, "tokenizer.tokens: per-token"),
    ({"tokenizer": {"source": "base", "pad_to_multiple_of": 64}}, "tokenizer.pad_to_multiple_of"),
    ({"tokenizer_source": "elsewhere/m"}, "tokenizer_source: 'elsewhere/m' is not one of the merged models"),
    ({"tokenizer_source": "a+lora/x"}, "applies a LoRA"),
    ({"tokenizer_source": "base", "tokenizer": {"source": "union"}}, "tokenizer, tokenizer_source: both given"),
    ({"parameters": {"density": [0.2, 0.8]}}, "parameters.density: [0.2, 0.8] is a gradient"),
    ({"parameters": {"normalize": False}}, "normalize: false"),
    ({"models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "c", "parameters": {"weight": 0.3}}]},
     "unequal weights"),
])
def test_untranslatable_parts_are_named(tmp_path, change, named):
    d = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}, {"model": "c"}], **change}
    with pytest.raises(ConfigError, match="cannot translate|no tadrop counterpart") as e:
        translate(d, "mk.yml")
    assert named in str(e.value)


def test_untranslatable_config_through_the_cli(tmp_path):
    p = _write(tmp_path, {"merge_method": "ties", "base_model": "b", "slices": [], "models": [{"model": "a"}],
                          "parameters": {"epsilon": 0.1}})
    proc = run_cli("merge", p, tmp_path / "out")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "parameters.epsilon" in proc.stderr and "slices" in proc.stderr
    assert not (tmp_path / "out").exists()
