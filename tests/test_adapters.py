"""LoRA / PEFT adapters as fine-tunes (SPEC section 5): our tau equals peft's merge_and_unload() minus
the base to float32 rounding for every supported flavour, on adapters peft itself builds on tiny
transformers models; untouched tensors have tau = 0; every refusal names what is wrong."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.checkpoints import Checkpoint
from pipeline.config import load_config
from pipeline.run import merge
from pipeline.sources import LoraAdapter

from conftest import run_cli
from tiny_hf import make_adapter, peft_merged, perturb_, save, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
EPS = torch.finfo(torch.float32).eps


def load_causal(d):
    return transformers.AutoModelForCausalLM.from_pretrained(d).eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"llama": save(perturb_(tiny_llama(), 1), root / "llama"),
            "gpt2": save(perturb_(tiny_gpt2(), 2), root / "gpt2")}


FLAVOURS = {
    "all_linear": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                              rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 3},
                              alpha_pattern={"down_proj": 5, "q_proj": 2})),
    "rslora": ("llama", dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["k_proj", "up_proj"])),
    "embedding_and_modules_to_save": ("llama", dict(r=3, lora_alpha=4, target_modules=["embed_tokens", "o_proj"],
                                                    modules_to_save=["lm_head"])),
    "fan_in_fan_out_lora_bias": ("gpt2", dict(r=4, lora_alpha=4, fan_in_fan_out=True, lora_bias=True,
                                              target_modules=["c_attn", "c_proj", "c_fc"])),
    "bias_only": ("gpt2", dict(r=2, lora_alpha=2, fan_in_fan_out=True, bias="all", target_modules=["c_attn"])),
}


def our_tau(adapter_dir, base_dir, chunk=None):
    base = Checkpoint.open(base_dir, "base")
    ad = LoraAdapter("a", adapter_dir)
    assert ad.bind(base) == []
    out = {}
    for name, info in base.tensors.items():
        shape, rows = tuple(info.shape), info.rows
        step = chunk or rows
        out[name] = torch.cat([ad.delta(name, shape, r0, min(rows, r0 + step), base)
                               for r0 in range(0, rows, step)]).reshape(shape)
    return out, ad


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_tau_equals_peft_merge_minus_base(tmp_path, bases, flavour):
    arch, kw = FLAVOURS[flavour]
    adir = make_adapter(bases[arch], tmp_path / "ad", load_causal, **kw)
    merged = peft_merged(bases[arch], adir, load_causal)
    base_sd = load_file(str(bases[arch] / "model.safetensors"))
    whole, ad = our_tau(adir, bases[arch])
    chunked, _ = our_tau(adir, bases[arch], chunk=5)
    touched = 0
    for name, w in base_sd.items():
        want = merged[name] - w
        for got in (whole[name], chunked[name]):
            # merged[name] was rounded once to float32 (half an ulp of |W + tau|), and the r products
            # summed in B @ A may round differently (BLAS order): a few ulps of the magnitudes involved
            tol = 4 * EPS * (w.abs() + merged[name].abs() + got.abs().max())
            assert bool(((got - want).abs() <= tol).all()), (flavour, name, float((got - want).abs().max()))
        if ad.touched(name):
            touched += 1
            assert whole[name].abs().sum() > 0, name
        else:   # SPEC 5: a tensor the adapter does not touch has tau = 0, and peft leaves it as is
            assert torch.equal(whole[name], torch.zeros_like(w)) and torch.equal(merged[name], w), name
    assert touched >= 2


def test_rank_pattern_is_per_module(tmp_path, bases):
    adir = make_adapter(bases["llama"], tmp_path / "ad", load_causal, **FLAVOURS["patterns"][1])
    ad = LoraAdapter("a", adir)
    ad.bind(Checkpoint.open(bases["llama"], "base"))
    scale = {n: ps[0].scaling for n, ps in ad.pieces.items()}
    assert scale["model.layers.1.self_attn.q_proj.weight"] == 2 / 3
    assert scale["model.layers.0.self_attn.q_proj.weight"] == 2 / 4
    assert scale["model.layers.0.self_attn.v_proj.weight"] == 8 / 2
    assert scale["model.layers.0.mlp.down_proj.weight"] == 5 / 4


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_delta_into_the_engines_buffer_has_the_same_bits(tmp_path, bases, flavour):
    """The engine hands its float32 buffer to `delta(out=...)`: B @ A computed straight into it (or,
    where the buffer is not aligned like a fresh tensor, into a temporary) has the bits of the plain call."""
    arch, kw = FLAVOURS[flavour]
    adir = make_adapter(bases[arch], tmp_path / "ad", load_causal, **kw)
    base = Checkpoint.open(bases[arch], "base")
    ad = LoraAdapter("a", adir)
    assert ad.bind(base) == []
    for name, info in base.tensors.items():
        shape, rows = tuple(info.shape), max(1, info.rows)
        for r0, r1 in ((0, rows), (1, min(rows, 6))):
            if r1 <= r0:
                continue
            want = ad.delta(name, shape, r0, r1, base).reshape(-1)
            m = want.numel()
            buf = torch.full((m + 16,), float("nan"))
            for out in (buf[:m], buf[1:m + 1]):          # 64-byte aligned, and not
                got = ad.delta(name, shape, r0, r1, base, out=out).reshape(-1)
                assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (flavour, name, r0)
                if ad.touched(name) and out.data_ptr() % 64 == 0 and ad.pieces[name][0].kind != "bias":
                    assert got.data_ptr() == out.data_ptr(), name     # no temporary (biases are tiny)


# -- through the pipeline --------------------------------------------------------------------------

def write_cfg(path, base, models, out, **kw):
    cfg = {"base": str(base), "models": models, "output": str(out), "workers": 1, "memory_budget": "256MiB", **kw}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, bases):
    """Two adapters (one as `adapter:`, one as a `path:` holding adapter_config.json) and a full fine-tune."""
    root = tmp_path_factory.mktemp("mixed")
    b = bases["llama"]
    a1 = make_adapter(b, root / "a1", load_causal, seed=3, r=4, lora_alpha=8, target_modules="all-linear")
    a2 = make_adapter(b, root / "a2", load_causal, seed=4, r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"])
    full = save(perturb_(load_causal(b), 9, scale=0.003), root / "full")
    return {"base": b, "a1": a1, "a2": a2, "full": full}


@pytest.mark.slow
def test_adapters_and_full_finetune_mix_in_one_merge(tmp_path, mixed):
    models = [{"name": "a1", "adapter": str(mixed["a1"])}, {"name": "a2", "path": str(mixed["a2"])},
              {"name": "full", "path": str(mixed["full"])}]
    cfg = load_config(write_cfg(tmp_path / "c.yaml", mixed["base"], models, tmp_path / "run",
                                method="task_arithmetic", **{"lambda": 1.0}))
    merge(cfg, quiet=True)
    got = load_file(str(tmp_path / "run" / "merged" / "model-00001-of-00001.safetensors"))
    base = load_file(str(mixed["base"] / "model.safetensors"))
    full = load_file(str(mixed["full"] / "model.safetensors"))
    p1, p2 = (peft_merged(mixed["base"], mixed[a], load_causal) for a in ("a1", "a2"))
    for name, w in base.items():
        want = (w.double() + (p1[name].double() - w.double()) + (p2[name].double() - w.double())
                + (full[name].double() - w.double()))
        tol = 8 * EPS * (w.double().abs() + want.abs()) + 1e-30
        assert bool(((got[name].double() - want).abs() <= tol).all()), name
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["inputs"]["a1"]["@adapter"] is True and "adapter_config.json" in record["inputs"]["a1"]


@pytest.mark.slow
def test_untouched_tensors_have_zero_task_vectors_in_every_method(tmp_path, bases):
    """SPEC 5: adapters touching only q_proj: elsewhere TA/TIES/consensus give the base, EMR/TALL a zero
    unified vector and empty masks, TADrop keeps zero; where every task is zero the output is the base."""
    b = bases["llama"]
    ads = [make_adapter(b, tmp_path / f"q{i}", load_causal, seed=10 + i, r=2, lora_alpha=4,
                        target_modules=["q_proj"]) for i in range(2)]
    models = [{"name": f"q{i}", "adapter": str(a)} for i, a in enumerate(ads)]
    base = load_file(str(b / "model.safetensors"))
    import zarr
    for method, extra in [("task_arithmetic", {}), ("ties", {}), ("emr", {"sparsify": {"kind": "tadrop"}}),
                          ("tall_masks", {}), ("consensus", {"consensus": {"k_min": 1}})]:
        out = tmp_path / f"run-{method}"
        merge(load_config(write_cfg(tmp_path / f"{method}.yaml", b, models, out, method=method, **extra)),
              quiet=True)
        merged = out / "merged" / "model-00001-of-00001.safetensors"
        res = load_file(str(merged if merged.exists() else out / "unified" / "model-00001-of-00001.safetensors"))
        masks = zarr.open_group(str(out / "masks.zarr"), mode="r") if (out / "masks.zarr").exists() else None
        for name, w in base.items():
            if "q_proj" in name:
                assert not torch.equal(res[name], w if merged.exists() else torch.zeros_like(w)), (method, name)
                continue
            if merged.exists():
                assert torch.equal(res[name], w), (method, name)
            else:
                assert torch.equal(res[name], torch.zeros_like(w)), (method, name)
            if masks is not None:
                assert not masks[name][...].any(), (method, name)


# -- refusals (one line, exit 1, before any work) --------------------------------------------------

def refused(tmp_path, base, models, *needles, **kw):
    out = tmp_path / "run"
    proc = run_cli("merge", write_cfg(tmp_path / "bad.yaml", base, models, out, **kw))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr
    assert not out.exists()
    return proc.stderr


@pytest.mark.parametrize("kind,kw,needle", [
    ("dora", dict(r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True), "DoRA"),
    ("ia3", dict(config_cls="IA3Config", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
     "'IA3'"),
    ("loha", dict(config_cls="LoHaConfig", r=2, target_modules=["q_proj"]), "'LOHA'"),
    ("lokr", dict(config_cls="LoKrConfig", r=2, target_modules=["q_proj"]), "'LOKR'"),
])
def test_unsupported_peft_types_are_refused_by_name(tmp_path, bases, kind, kw, needle):
    kw = dict(kw)
    if "config_cls" in kw:
        kw["config_cls"] = getattr(peft, kw["config_cls"])
    adir = make_adapter(bases["llama"], tmp_path / kind, load_causal, **kw)
    refused(tmp_path, bases["llama"], [{"name": kind, "adapter": str(adir)}], needle, f"'{kind}'")


def test_adapter_of_another_base_model_is_refused(tmp_path, bases):
    other = save(perturb_(tiny_llama(), 7), tmp_path / "other-model")
    adir = make_adapter(other, tmp_path / "ad", load_causal, r=2, lora_alpha=2, target_modules=["q_proj"])
    assert json.loads((adir / "adapter_config.json").read_text())["base_model_name_or_path"].endswith("other-model")
    msg = refused(tmp_path, bases["llama"], [{"name": "x", "adapter": str(adir)}], "other-model", "'x'",
                  "base_model_name_or_path")
    assert len(msg.strip().splitlines()) == 1
    # the user can vouch for it (same architecture here): then it merges
    cfg = load_config(write_cfg(tmp_path / "ok.yaml", bases["llama"],
                                [{"name": "x", "adapter": str(adir), "check_base": False}], tmp_path / "ok"))
    merge(cfg, quiet=True)
    assert (tmp_path / "ok" / "merged").is_dir()


def test_adapter_shapes_that_do_not_fit_the_base_are_named(tmp_path, bases):
    import transformers as tf
    torch.manual_seed(0)
    wide = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              max_position_embeddings=32))
    wdir = save(wide, tmp_path / "w" / "llama")       # same directory name as the base: the name check passes
    adir = make_adapter(wdir, tmp_path / "ad", load_causal, r=2, lora_alpha=2, target_modules=["down_proj"])
    refused(tmp_path, bases["llama"], [{"name": "wide", "adapter": str(adir)}], "'wide'",
            "model.layers.0.mlp.down_proj", "[2, 40]", "[16, 24]")


def test_adapter_without_safetensors_weights_is_refused(tmp_path, bases):
    adir = make_adapter(bases["llama"], tmp_path / "ad", load_causal, r=2, lora_alpha=2, target_modules=["q_proj"])
    (adir / "adapter_model.safetensors").rename(adir / "adapter_model.bin")
    refused(tmp_path, bases["llama"], [{"name": "b", "adapter": str(adir)}], "adapter_model.bin", "'b'")


def test_exactly_one_of_path_and_adapter(tmp_path, bases):
    refused(tmp_path, bases["llama"], [{"name": "n", "path": "/x", "adapter": "/y"}], "exactly one of path")
