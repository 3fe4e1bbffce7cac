"""Extended vocabularies (SPEC section 5): fine-tunes that added tokens (resize_token_embeddings) merged
under tokenizer_source base | union | a model's name; tied embeddings stay tied; differing tokens refused."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.export import export_task
from pipeline.plan import build_spec
from pipeline.run import merge
from tadrop.reference import merge_state_dicts

from conftest import run_cli
from tiny_hf import perturb_, tiny_llama

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def write_tokenizer(d: Path, extra: list[str], rename: dict[int, str] | None = None):
    words = [f"w{i}" for i in range(64)]
    for i, t in (rename or {}).items():
        words[i] = t
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(extra)
    tok.save(str(d / "tokenizer.json"))


def model_dir(root: Path, name: str, extra: list[str], seed: int, tie=False, rename=None) -> Path:
    m = tiny_llama(tie=tie)
    if seed:
        if extra:
            m.resize_token_embeddings(64 + len(extra))
        perturb_(m, seed)
    else:
        perturb_(m, 100)
    d = root / name
    m.save_pretrained(d)
    write_tokenizer(d, extra, rename)
    return d


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    chat = ["<|im_start|>", "<|im_end|>"]
    return {"base": model_dir(root, "base", [], 0), "a": model_dir(root, "a", chat, 1),
            "b": model_dir(root, "b", [], 2), "c": model_dir(root, "c", chat + ["<tool>"], 3)}


def cfg(tmp, fam, out, names=("a", "b", "c"), **kw):
    d = {"base": str(fam["base"]), "models": [{"name": n, "path": str(fam[n])} for n in names],
         "output": str(tmp / out), "workers": 1, "memory_budget": "64MiB", "method": "task_arithmetic",
         "lambda": 1.0, **kw}
    (tmp / f"{out}.yaml").write_text(yaml.safe_dump(d))
    return tmp / f"{out}.yaml"


def sd(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
def test_union_extends_the_base_by_the_mean_of_the_models_that_have_each_row(tmp_path, vocab_family):
    fam = vocab_family
    merge(load_config(cfg(tmp_path, fam, "union", tokenizer_source="union")), quiet=True)
    out, base = sd(tmp_path / "union" / "merged"), sd(fam["base"])
    a, b, c = (sd(fam[n]) for n in "abc")
    for name in (EMB, HEAD):
        assert out[name].shape == (67, 16)
        w0 = base[name].double()
        want = torch.empty(67, 16, dtype=torch.float64)
        want[:64] = w0 + sum(t[name][:64].double() - w0 for t in (a, b, c))
        mean = (a[name][64:66].double() + c[name][64:66].double()) / 2
        want[64:66] = mean + (a[name][64:66].double() - mean) + (c[name][64:66].double() - mean)  # b: tau 0
        want[66] = c[name][66].double()                                  # only c has it: its own row
        assert torch.allclose(out[name].double(), want, atol=1e-6), name
    conf = json.loads((tmp_path / "union" / "merged" / "config.json").read_text())
    assert conf["vocab_size"] == 67
    assert (tmp_path / "union" / "merged" / "tokenizer.json").read_bytes() == (fam["c"] / "tokenizer.json").read_bytes()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "union" / "merged")
    assert model(torch.tensor([[1, 64, 66]])).logits.shape == (1, 3, 67)


@pytest.mark.slow
def test_base_vocabulary_drops_extra_rows_with_a_count(tmp_path, vocab_family, caplog):
    fam = vocab_family
    with caplog.at_level(logging.WARNING, logger="tadrop"):
        c = load_config(cfg(tmp_path, fam, "base"))
        merge(c, quiet=True)
    assert any("5 vocabulary row(s)" in r.getMessage() and "a: 2, c: 3" in r.getMessage()
               for r in caplog.records), caplog.text
    out, base = sd(tmp_path / "base" / "merged"), sd(fam["base"])
    tasks = [{k: v[:64] if k in (EMB, HEAD) else v for k, v in sd(fam[n]).items()} for n in "abc"]
    ref = merge_state_dicts(build_spec(c), base, tasks)
    for name, t in out.items():
        assert torch.equal(t, ref.merged[name]), name
    assert json.loads((tmp_path / "base" / "merged" / "config.json").read_text())["vocab_size"] == 64


@pytest.mark.slow
def test_a_models_vocabulary_and_emr_export(tmp_path, vocab_family):
    fam = vocab_family
    merge(load_config(cfg(tmp_path, fam, "emr", tokenizer_source="a", method="emr",
                          sparsify={"kind": "tadrop"})), quiet=True)
    uni = sd(tmp_path / "emr" / "unified")
    assert uni[EMB].shape == (66, 16) and uni[HEAD].shape == (66, 16)
    export_task(tmp_path / "emr", "b", tmp_path / "task-b")
    got = sd(tmp_path / "task-b")
    a, c = sd(fam["a"]), sd(fam["c"])
    # model b has no rows 64, 65: its task model there is the extended base, the mean of a and c
    assert torch.allclose(got[EMB][64:66], (a[EMB][64:66] + c[EMB][64:66]) / 2, atol=1e-6)
    assert json.loads((tmp_path / "task-b" / "config.json").read_text())["vocab_size"] == 66
    assert (tmp_path / "task-b" / "tokenizer.json").read_bytes() == (fam["a"] / "tokenizer.json").read_bytes()
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "task-b")


@pytest.mark.slow
def test_tied_embeddings_stay_tied(tmp_path):
    fam = {"base": model_dir(tmp_path, "base", [], 0, tie=True),
           "a": model_dir(tmp_path, "a", ["<x>", "<y>"], 1, tie=True)}
    assert HEAD not in sd(fam["a"])
    merge(load_config(cfg(tmp_path, fam, "run", names=("a",), tokenizer_source="union")), quiet=True)
    out = sd(tmp_path / "run" / "merged")
    assert HEAD not in out and out[EMB].shape == (66, 16)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, out[EMB])


def test_differing_tokenizer_names_the_first_differing_id(tmp_path, vocab_family):
    fam = dict(vocab_family, d=model_dir(tmp_path, "d", ["<|im_start|>"], 4, rename={5: "other", 9: "x"}))
    proc = run_cli("merge", cfg(tmp_path, fam, "bad", names=("a", "d"), tokenizer_source="union"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "token id 5" in line and "'other'" in line and "'w5'" in line and "model 'd'" in line
    assert not (tmp_path / "bad").exists()


def test_tokenizer_source_must_name_a_model(tmp_path, vocab_family):
    proc = run_cli("merge", cfg(tmp_path, vocab_family, "bad", tokenizer_source="zzz"))
    assert proc.returncode == 1 and "tokenizer_source" in proc.stderr and "'zzz'" in proc.stderr


def _mergekit_rows(models: dict, vocab: int, name: str) -> dict:
    """Each model's embedding rows in an output vocabulary of `vocab` tokens by mergekit's rules
    (mergekit/tokenizer/embed.py, PermutedEmbeddings; the ids agree here, so a token is its id): a model
    that has the token keeps its row; for one that lacks it, the row of the only model that has it, else
    the base's (never here: every model has the base's rows), else the mean of those that have it."""
    out = {}
    for m, w in models.items():
        rows = torch.empty(vocab, w[name].shape[1], dtype=torch.float64)
        for i in range(vocab):
            if i < w[name].shape[0]:
                rows[i] = w[name][i].double()
                continue
            have = [v[name][i].double() for v in models.values() if i < v[name].shape[0]]
            rows[i] = have[0] if len(have) == 1 else torch.stack(have).mean(0)
        out[m] = rows
    return out


@pytest.mark.slow
@pytest.mark.parametrize("source,ours,rows", [("union", "union", 67), ("a", "a", 66)])
def test_mergekit_tokenizer_source_through_the_cli(tmp_path, vocab_family, source, ours, rows):
    """A mergekit config's tokenizer_source (union, or a merged model's path) runs as tadrop's and gives
    mergekit's rows: task_arithmetic (mergekit's defaults: lambda 1, no normalize) on the embeddings each
    model has in the output vocabulary."""
    fam = vocab_family
    mk = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
          "tokenizer_source": source if source == "union" else str(fam[source]),
          "models": [{"model": str(fam[n]), "parameters": {"weight": 1.0}} for n in "abc"]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(mk))
    proc = run_cli("merge", tmp_path / "mk.yml", tmp_path / "run", "--quiet", check=True)
    printed = yaml.safe_load(proc.stdout)
    assert printed["tokenizer_source"] == ours and [m["name"] for m in printed["models"]] == list("abc")
    out = sd(tmp_path / "run" / "merged")
    w = {n: sd(fam[n]) for n in ("base", "a", "b", "c")}
    for name, t in out.items():
        if name in (EMB, HEAD):
            p = _mergekit_rows(w, rows, name)
            want = p["base"] + sum(p[n] - p["base"] for n in "abc")
        else:
            want = w["base"][name].double() + sum(w[n][name].double() - w["base"][name].double() for n in "abc")
        assert t.shape == want.shape and torch.allclose(t.double(), want, atol=1e-6), name
    assert json.loads((tmp_path / "run" / "merged" / "config.json").read_text())["vocab_size"] == rows


# -- adapters trained on an extended vocabulary ------------------------------------------------------

def resized_adapter(base: Path, out: Path, extra: list[str], seed: int, **lora_kw) -> Path:
    """A PEFT adapter trained after resize_token_embeddings (peft saves the resized embedding layers)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_pretrained(base)
    m.resize_token_embeddings(64 + len(extra))
    pm = peft.get_peft_model(m, peft.LoraConfig(init_lora_weights=False, **lora_kw))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pm.save_pretrained(out)
    write_tokenizer(out, extra)
    return out


def peft_merged_resized(base: Path, adapter: Path, rows: int) -> dict:
    """peft's own merge of the adapter onto the base resized as the adapter was trained."""
    import peft
    m = transformers.AutoModelForCausalLM.from_pretrained(base)
    m.resize_token_embeddings(rows)
    merged = peft.PeftModel.from_pretrained(m, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


RESIZED = {   # how peft saves the resized rows: whole layers, modules_to_save copies, LoRA on base_layer
    "resized_only": dict(r=4, lora_alpha=8, target_modules=["q_proj"]),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    "embedding_lora": dict(r=3, lora_alpha=6, target_modules=["q_proj", "embed_tokens", "lm_head"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("flavour", sorted(RESIZED))
def test_adapter_on_an_extended_vocabulary_equals_peft_merge(tmp_path, vocab_family, flavour):
    """SPEC 5: an adapter is a fine-tune; its rows beyond V0 are its saved full tensor (+ its LoRA update)."""
    fam = vocab_family
    chat = ["<|im_start|>", "<|im_end|>"]
    adir = resized_adapter(fam["base"], tmp_path / "ad", chat, 5, **RESIZED[flavour])
    want = peft_merged_resized(fam["base"], adir, 66)
    d = {"base": str(fam["base"]), "models": [{"name": "x", "adapter": str(adir)}], "output": str(tmp_path / "run"),
         "workers": 1, "memory_budget": "64MiB", "method": "task_arithmetic", "lambda": 1.0,
         "tokenizer_source": "union", "output_dtype": "float32"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    merge(load_config(tmp_path / "c.yaml"), quiet=True)
    out, base = sd(tmp_path / "run" / "merged"), sd(fam["base"])
    eps = torch.finfo(torch.float32).eps
    for name, w in want.items():
        got = out[name]
        assert got.shape == w.shape, name
        tol = 4 * eps * (w.abs() + got.abs() + (w - (base[name] if base[name].shape == w.shape else w)).abs().max())
        assert bool(((got - w).abs() <= tol + 1e-7).all()), (flavour, name, float((got - w).abs().max()))
    assert json.loads((tmp_path / "run" / "merged" / "config.json").read_text())["vocab_size"] == 66
    assert (tmp_path / "run" / "merged" / "tokenizer.json").read_bytes() == (adir / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_adapter_and_full_finetune_rows_are_averaged_over_the_models_that_have_them(tmp_path, vocab_family):
    fam = vocab_family
    adir = resized_adapter(fam["base"], tmp_path / "ad", ["<|im_start|>", "<|im_end|>"], 6, r=2, lora_alpha=2,
                           target_modules=["v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    x = peft_merged_resized(fam["base"], adir, 66)
    d = {"base": str(fam["base"]), "models": [{"name": "x", "adapter": str(adir)}, {"name": "c", "path": str(fam["c"])}],
         "output": str(tmp_path / "run"), "workers": 1, "memory_budget": "64MiB", "method": "task_arithmetic",
         "lambda": 1.0, "tokenizer_source": "union", "output_dtype": "float32"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    merge(load_config(tmp_path / "c.yaml"), quiet=True)
    out, c = sd(tmp_path / "run" / "merged"), sd(fam["c"])
    for name in (EMB, HEAD):
        mean = (x[name][64:66].double() + c[name][64:66].double()) / 2
        want = mean + (x[name][64:66].double() - mean) + (c[name][64:66].double() - mean)
        assert torch.allclose(out[name][64:66].double(), want, atol=1e-6), name
        assert torch.equal(out[name][66], c[name][66]), name          # only c has row 66


def test_adapter_that_extends_the_embeddings_but_not_the_head_is_refused(tmp_path, vocab_family):
    """peft saves a targeted embedding's resized base_layer but not an untargeted, resized lm_head:
    the fine-tune's head rows beyond V0 are not in the adapter."""
    adir = resized_adapter(vocab_family["base"], tmp_path / "ad", ["<x>", "<y>"], 7, r=2, lora_alpha=2,
                           target_modules=["q_proj", "embed_tokens"])
    d = {"base": str(vocab_family["base"]), "models": [{"name": "emb", "adapter": str(adir)}],
         "output": str(tmp_path / "run"), "workers": 1, "tokenizer_source": "union"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    proc = run_cli("merge", tmp_path / "c.yaml")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "adapter 'emb'" in line and EMB in line and HEAD in line and "66 rows" in line, line
    assert not (tmp_path / "run").exists()
