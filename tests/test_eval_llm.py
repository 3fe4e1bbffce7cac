"""Structure of the decoder-LLM benchmark (scripts/eval_llm/) at toy size: the
data split and hash manifest, sequence packing, the kept-share normalisation and
its paired bootstrap, and one merge of a tiny LLaMA through the product."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "eval_llm"))

import build_data  # noqa: E402
import lm  # noqa: E402
import merges  # noqa: E402
from scores import Scores, kept_share, mean_share, paired_bootstrap  # noqa: E402


def test_split_docs_disjoint_in_budget_order(monkeypatch):
    monkeypatch.setattr(build_data, "TEST_CHARS", 30)
    monkeypatch.setattr(build_data, "VAL_CHARS", 20)
    monkeypatch.setattr(build_data, "PRE_CHARS", 20)
    monkeypatch.setattr(build_data, "TRAIN_CHARS", 40)
    docs = [f"doc{i:02d}-" + "x" * 4 for i in range(40)]            # 10 characters each
    s = build_data.split_docs(docs, "d")
    assert [len(s[k]) for k in ("test", "val", "pretrain", "train")] == [3, 2, 2, 4]
    seen = [d for k in s for d in s[k]]
    assert len(seen) == len(set(seen))                             # each document in one split
    assert build_data.split_docs(docs, "d") == s                   # seeded
    assert build_data.split_docs(docs, "other") != s               # per-domain order
    with pytest.raises(SystemExit, match="domain d: only"):
        build_data.split_docs(docs[:6], "d")


def _manifest(**over):
    m = {"domains": {"man": {"sha256": "a" * 64}, "c": {"sha256": "b" * 64}},
         "tokenizer_sha256": "t" * 64, "packages": {"apt:manpages": "6.03-2"}}
    m.update(over)
    return m


def test_manifest_differences_name_what_changed(tmp_path):
    want = _manifest()
    assert build_data.differences(want, _manifest()) == []
    got = _manifest(domains={"man": {"sha256": "a" * 64}, "c": {"sha256": "c" * 64}},
                    packages={"apt:manpages": "6.04-1"})
    bad = build_data.differences(want, got)
    assert bad[0] == "domain c" and "apt:manpages" in bad[-1]
    assert "tokenizer.json" in build_data.differences(want, _manifest(tokenizer_sha256="u" * 64))
    assert "domain c missing" in build_data.differences(want, _manifest(domains={"man": {"sha256": "a" * 64}}))

    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(want))
    with pytest.raises(SystemExit, match="data differs from manifest.json: domain c"):
        build_data._check(got, tmp_path, update=False, strict=True, path=path)
    assert build_data._check(got, tmp_path, update=False, strict=False, path=path)["matches_manifest"] is False
    assert json.loads(path.read_text()) == want                    # a check never rewrites it
    assert build_data._check(_manifest(), tmp_path, update=False, strict=True, path=path)["matches_manifest"]


def test_tokenizer_and_pack(tmp_path):
    texts = ["def f(x):\n    return x + 1\n", "int main(void) { return 0; }", "a quote about work"] * 30
    tok_json = build_data.train_tokenizer(texts, tmp_path / "tok")
    assert tok_json.exists()
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert tok.decode(tok(texts[0])["input_ids"]) == texts[0]       # byte-level: lossless
    rows = build_data.pack(texts, tok)
    assert rows.dtype == torch.int16 and rows.shape[1] == build_data.SEQ
    eos = tok.convert_tokens_to_ids(build_data.EOS)
    assert (rows == eos).sum() >= rows.numel() // 40                # documents separated by EOS
    assert build_data.pack(texts, tok, n_max=1).shape[0] == 1


def test_kept_share_normalisation(tmp_path):
    assert kept_share(3.0, 2.0, 2.5) == pytest.approx(0.5)
    assert kept_share(3.0, 2.0, 2.0) == pytest.approx(1.0)
    assert kept_share(3.0, 2.0, 3.5) == pytest.approx(-0.5)         # worse than the base
    with pytest.raises(ValueError, match="did not lower"):
        kept_share(3.0, 3.0, 2.0)
    s = Scores(tmp_path / "scores.json")
    for label, v in (("base", 4.0), ("ind", 2.0), ("m", 3.0)):
        s.put(label, "test", "man", [v - 0.1, v + 0.1])
        s.put(label, "test", "c", [v, v])
    s.put("m", "test", "c", [2.5, 2.5])
    out = mean_share(Scores(tmp_path / "scores.json"), "m", "base", "ind", "test", ["man", "c"])
    assert out["man"] == pytest.approx(0.5) and out["c"] == pytest.approx(0.75)
    assert out["mean"] == pytest.approx(0.625)


def test_paired_bootstrap_signs_and_zero():
    rng = np.random.default_rng(1)
    base = [4 + rng.normal(0, 0.3, 40) for _ in range(3)]
    ind = [b - 1.0 for b in base]
    better = [b - 0.6 for b in base]
    worse = [b - 0.2 for b in base]
    same = paired_bootstrap(base, ind, better, better)
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0
    r = paired_bootstrap(base, ind, better, worse)
    assert r["diff"] == pytest.approx(0.4) and r["lo"] > 0 and r["domains_up"] == 3
    # A row's own CI: the share versus the base (share 0).
    own = paired_bootstrap(base, ind, better, base)
    assert own["diff"] == pytest.approx(0.6) and own["lo"] <= 0.6 <= own["hi"]


def _save_toy(model, tok_dir: Path, out: Path) -> Path:
    lm._save(model, tok_dir, out, {"toy": True})
    return out


@pytest.mark.slow
def test_toy_merge_through_the_product(tmp_path):
    """A tiny LLaMA, two perturbed 'fine-tunes', TA and EMR through the pipeline:
    the merged checkpoint is base + lambda * sum(tau) and loads as a LlamaForCausalLM."""
    torch.set_num_threads(1)
    tok_dir = tmp_path / "tok"
    build_data.train_tokenizer(["hello world, merge me"] * 20, tok_dir)
    base_model = lm.make_model("toy", vocab=300, seq=build_data.SEQ)
    base = _save_toy(base_model, tok_dir, tmp_path / "base")
    sd = base_model.state_dict()
    models = []
    for i, name in enumerate(("man", "c")):
        g = torch.Generator().manual_seed(i)
        m = lm.make_model("toy", vocab=300, seq=build_data.SEQ)
        m.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()})
        models.append({"name": name, "path": str(_save_toy(m, tok_dir, tmp_path / name))})
    run = merges.merge("ta", {"method": "task_arithmetic", "lambda": 0.5, "sparsify": {"kind": "none"}},
                       base, models, tmp_path)
    assert merges.complete(run) and merges.merge_seconds(run) is not None
    merged = lm.load(run / "merged").state_dict()
    fts = [lm.load(Path(m["path"])).state_dict() for m in models]
    for k in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        want = sd[k] + 0.5 * ((fts[0][k] - sd[k]) + (fts[1][k] - sd[k]))
        torch.testing.assert_close(merged[k], want, atol=1e-6, rtol=0)
    # Re-running the same spec reuses the complete run.
    stamp = (run / "bench_timing.json").read_text()
    assert merges.merge("ta", {"method": "task_arithmetic", "lambda": 0.5, "sparsify": {"kind": "none"}},
                        base, models, tmp_path) == run
    assert (run / "bench_timing.json").read_text() == stamp
    emr = merges.merge("emr", {"method": "emr", "sparsify": {"kind": "tadrop"}}, base, models, tmp_path)
    exported = lm.load(merges.export(emr, "c"))
    x = torch.randint(0, 300, (2, build_data.SEQ), dtype=torch.int16)
    losses = lm.seq_losses(exported, x)
    assert len(losses) == 2 and all(np.isfinite(losses))

def test_supports_names_the_refused_key():
    names = ["man", "c"]
    assert merges.supports({"method": "emr", "sparsify": {"kind": "tadrop"}}, names) is None
    assert merges.supports({"method": "tall_masks", "tall": {"lambdas": {"man": 0.2, "c": 0.4}}}, names) is None
    assert "sparsify.tadrop.scope" in merges.supports(
        {"method": "emr", "sparsify": {"kind": "tadrop", "scope": "nowhere"}}, names)
    assert merges.supports({"method": "tall_masks", "tall": {"lambdas": {"perl": 0.2}}}, names)


def test_results_tables_from_synthetic_scores(tmp_path):
    """results.write on scores made up here: every table, the not-run rows and the
    JSON record come out, and the numbers are the kept shares of the scores."""
    import types

    import bench as bench_mod
    import results
    doms = ["man", "c"]
    s = Scores(tmp_path / "scores.json")
    rng = np.random.default_rng(0)
    noise = {d: rng.normal(0, 0.05, 24) for d in doms}
    level = {"base": 4.0, "individual": 3.0, "ta@0.5": 3.5, "emr": 3.2, "emr_tadrop": 3.1}
    for setting in ("full", "lora", "long"):
        for d in doms:
            s.put("base", "test", d, list(level["base"] + noise[d]))
            for lab in ("individual", "ta@0.5", "emr", "emr_tadrop"):
                s.put(f"{setting}/{lab}", "test", d, list(level[lab] + noise[d]))
    rows = {st: {"ta": ("ta@0.5", {"method": "task_arithmetic", "lambda": 0.5}),
                 "emr": ("emr", {"method": "emr"}), "emr_tadrop": ("emr_tadrop", {"method": "emr"})}
            for st in ("full", "lora", "long")}
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "train.json").write_text(json.dumps({"parameters": 1_377_408}))
    b = types.SimpleNamespace(
        domains=doms, scores=s, rows=rows, chosen={"full/ta": {"label": "ta@0.5", "val_share": 0.4}},
        not_run={"full/emr_mask_norm": "emr.tadrop: Extra inputs are not permitted"},
        recipes=bench_mod.RECIPES["toy"], size="toy", work=tmp_path, base=base_dir,
        manifest={"domains": {}, "sequences": {}, "packages": {}, "matches_manifest": True},
        grid_val={"0.5,0.95": 0.7})
    test = {st: {k: mean_share(s, f"{st}/{lab}", "base", f"{st}/individual", "test", doms)
                 for k, (lab, _) in rows[st].items()} for st in rows}
    results.write(tmp_path / "out", b, test, {"data": 1.0, "total": 1.0, "invocations": 1})
    md = (tmp_path / "out" / "eval_llm.md").read_text()
    assert "| Task arithmetic | **50.0** |" in md                      # (4.0 - 3.5) / (4.0 - 3.0)
    assert "| EMR + TADrop | **90.0** |" in md
    assert "EMR + TADrop vs EMR | +10.0 |" in md
    assert "| EMR + TADrop, mask, rescale norm |" in md and "not run" in md
    assert "PEFT adapter directories themselves" in md
    rec = json.loads((tmp_path / "out" / "eval_llm.json").read_text())
    assert rec["kept_share_test"]["full"]["ta"]["mean"] == pytest.approx(0.5)
    assert rec["paired_differences"]["full"]["EMR + TADrop vs EMR"]["lo"] > 0
    assert rec["not_run"] == b.not_run


def test_loader_reuses_one_model_and_is_strict(tmp_path):
    tok_dir = tmp_path / "tok"
    build_data.train_tokenizer(["hello world"] * 20, tok_dir)
    a = lm.make_model("toy", vocab=300, seq=build_data.SEQ, seed=0)
    b = lm.make_model("toy", vocab=300, seq=build_data.SEQ, seed=1)
    pa, pb = _save_toy(a, tok_dir, tmp_path / "a"), _save_toy(b, tok_dir, tmp_path / "b")
    loader = lm.Loader()
    m1 = loader.load(pa)
    m2 = loader.load(pb)
    assert m1 is m2                                                  # one object, new weights
    for k, v in b.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v)
    from safetensors.torch import load_file, save_file
    f = next(pb.glob("*.safetensors"))
    sd = load_file(str(f))
    sd.pop("lm_head.weight")
    save_file(sd, str(f))
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        loader.load(pb)
