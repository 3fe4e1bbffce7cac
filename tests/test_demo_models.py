"""The synthetic checkpoint generator (scripts/make_demo_models.py) that the demo,
the end-to-end tests and the benchmark stand on: loadable, deterministic, and
with deltas whose scale and tails vary per tensor and per task."""
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

_spec = importlib.util.spec_from_file_location(
    "make_demo_models", Path(__file__).resolve().parents[1] / "scripts" / "make_demo_models.py")
mdm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mdm)

TINY = dict(hidden=64, layers=2, intermediate=160, vocab=256, heads=4, kv_heads=2)


def _make(out, k=2, dtype="bfloat16", shards=1, seed=0, names=None, **kw):
    return mdm.make_models(out, **TINY, k=k, dtype=dtype, shards=shards, seed=seed, names=names, **kw)


def _load(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_layout_shapes_and_manifest(tmp_path):
    m = _make(tmp_path, k=2)
    assert m["tasks"] == {"math": str(tmp_path / "math"), "code": str(tmp_path / "code")}
    assert mdm.read_manifest(tmp_path)["params"]["k"] == 2
    sd = _load(tmp_path / "base")
    kv = TINY["kv_heads"] * TINY["hidden"] // TINY["heads"]
    assert sd["model.embed_tokens.weight"].shape == (256, 64)
    assert sd["lm_head.weight"].shape == (256, 64)
    assert sd["model.layers.1.self_attn.q_proj.weight"].shape == (64, 64)
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (kv, 64)
    assert sd["model.layers.1.self_attn.v_proj.weight"].shape == (kv, 64)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (64, 160)
    assert sd["model.norm.weight"].shape == (64,)
    assert len(sd) == 3 + 9 * TINY["layers"]
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert sum(t.numel() * 2 for t in sd.values()) == m["total_size"]
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "math" / "generation_config.json").exists()


@pytest.mark.parametrize("shards,dtype", [(1, "bfloat16"), (3, "float32")])
def test_transformers_loads_it(tmp_path, shards, dtype):
    transformers = pytest.importorskip("transformers")
    _make(tmp_path, k=1, dtype=dtype, shards=shards)
    d = tmp_path / "math"
    if shards > 1:
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        files = sorted(set(idx["weight_map"].values()))
        assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        assert idx["metadata"]["total_size"] == sum(t.numel() * 4 for t in _load(d).values())
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d))
    assert model.dtype == getattr(torch, dtype)
    stored = _load(d)
    got = model.state_dict()
    for name, t in stored.items():
        assert torch.equal(got[name], t), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, TINY["vocab"]) and torch.isfinite(logits).all()


def test_deterministic_and_independent_of_threads_order_and_k(tmp_path, monkeypatch):
    monkeypatch.setattr(mdm, "BLOCK", 1000)  # many blocks per tensor, so threads really interleave
    _make(tmp_path / "a", k=2, threads=1)
    _make(tmp_path / "b", k=2, threads=2)
    _make(tmp_path / "c", k=3, names=["chat", "math", "code"], threads=2)
    _make(tmp_path / "d", k=2, seed=1)
    for m in ("base", "math", "code"):
        assert _digest(tmp_path / "a" / m) == _digest(tmp_path / "b" / m) == _digest(tmp_path / "c" / m)
        assert _digest(tmp_path / "a" / m) != _digest(tmp_path / "d" / m)


def test_tasks_differ_and_delta_scale_and_tails_vary(tmp_path):
    _make(tmp_path, k=2)
    base = _load(tmp_path / "base")
    tasks = {t: _load(tmp_path / t) for t in ("math", "code")}
    med, drop = {}, {}
    for t, sd in tasks.items():
        for name, b in base.items():
            tau = (sd[name].float() - b.float()).abs().flatten().numpy()
            q50, q95 = np.quantile(tau, [0.5, 0.95])
            med[t, name], drop[t, name] = q50, q50 / (q95 + 1e-12)
    for name in base:
        assert not torch.equal(tasks["math"][name], tasks["code"][name]), name
        assert not torch.equal(tasks["math"][name], base[name]), name
    big = [n for n in base if base[n].dim() == 2]
    for t in tasks:
        m = np.array([med[t, n] for n in big])
        d = np.array([drop[t, n] for n in big])
        assert m.max() / m.min() > 3, "per-tensor delta scale should vary"
        assert d.max() - d.min() > 0.15, "TADrop's d = Q0.5/Q0.95 should vary across tensors"
    assert any(abs(med["math", n] / med["code", n] - 1) > 0.5 for n in big)


def test_rejects_bad_shapes_and_names(tmp_path):
    with pytest.raises(ValueError):
        mdm.make_models(tmp_path, hidden=60, heads=8, kv_heads=2, k=1)
    with pytest.raises(ValueError):
        mdm.make_models(tmp_path, **TINY, k=2, names=["math", "math"])
    with pytest.raises(ValueError):
        mdm.make_models(tmp_path, **TINY, k=1, names=["base"])


def test_cli_default_is_the_small_demo(tmp_path):
    assert mdm.main(["--out", str(tmp_path), "--quiet"]) == 0
    man = mdm.read_manifest(tmp_path)
    assert list(man["tasks"]) == ["math", "code", "chat", "multilingual"]
    assert man["params"]["hidden"] == 256 and man["total_size"] < 20e6
