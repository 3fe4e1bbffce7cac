"""The architectures people merge, as tiny random transformers models saved as sharded safetensors
(each model cut at different shard boundaries): EMR + TADrop and TIES through the merge, one EMR task
through export; transformers loads both and their logits equal those of the in-memory reference merge
(tadrop.reference) to float32 rounding. Plus the mixed-dtype rule: fp16 base with bf16 fine-tunes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.config import load_config
from pipeline.export import export_task
from pipeline.plan import build_spec
from pipeline.run import merge
from tadrop.reference import merge_state_dicts, task_model

from tiny_hf import perturb_

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCHS = {   # name: (config class, model class, config kwargs)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, num_key_value_heads=1, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=1)),       # q/k/v biases
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(SMALL, num_key_value_heads=1, head_dim=8)),  # tied head
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(SMALL, num_key_value_heads=2)),           # fused qkv
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                                   bos_token_id=1, eos_token_id=2)),       # Conv1D, tied head
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(SMALL)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(SMALL, num_key_value_heads=1, num_local_experts=4,
                                                            num_experts_per_tok=2)),        # MoE experts
    "bert": ("BertConfig", "BertForMaskedLM", dict(SMALL)),                                  # an encoder
}
SHARDS = ["5KB", "9KB", "3KB"]          # base, task a, task b: different boundaries per model
IDS = torch.tensor([[1, 5, 9, 2, 33, 7, 11, 4, 60, 3]])


def build(arch: str, seed: int):
    cfg_cls, model_cls, kw = ARCHS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**kw)
    model = getattr(transformers, model_cls)(config).eval()
    return perturb_(model, seed, scale=0.02 if seed else 0.05)


def load(arch: str, d: Path):
    return getattr(transformers, ARCHS[arch][1]).from_pretrained(d).eval()


def state_dict(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def reference_model(arch: str, base_dir: Path, weights: dict, out: Path):
    """The reference weights, written like a checkpoint beside the base's config, loaded the same way."""
    out.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(base_dir / "config.json", out / "config.json")
    return load(arch, out)


def family(root: Path, arch: str, dtypes=(torch.float32,) * 3):
    paths = {}
    for i, (name, dtype) in enumerate(zip(("base", "a", "b"), dtypes)):
        m = build(arch, seed=i).to(dtype)
        m.save_pretrained(root / name, max_shard_size=SHARDS[i])
        paths[name] = root / name
    assert len(list(paths["base"].glob("*.safetensors"))) > 1, "the base must be sharded"
    return paths


def run_merge(tmp: Path, paths: dict, name: str, **kw):
    cfg = {"base": str(paths["base"]), "models": [{"name": n, "path": str(paths[n])} for n in ("a", "b")],
           "output": str(tmp / name), "workers": 1, "memory_budget": "64MiB", **kw}
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    cfg = load_config(tmp / f"{name}.yaml")
    merge(cfg, quiet=True)
    return cfg


def close(got, want):
    return torch.allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_merges_load_with_reference_logits(tmp_path, arch):
    paths = family(tmp_path, arch)
    base_sd = state_dict(paths["base"])
    tasks = [state_dict(paths[n]) for n in ("a", "b")]
    plain = logits(load(arch, paths["base"]))

    cfg = run_merge(tmp_path, paths, "ties", method="ties", sparsify={"kind": "topk", "density": 0.3})
    ref = merge_state_dicts(build_spec(cfg), base_sd, tasks)
    got = logits(load(arch, tmp_path / "ties" / "merged"))
    want = logits(reference_model(arch, paths["base"], ref.merged, tmp_path / "ref-ties"))
    assert close(got, want), (arch, float((got - want).abs().max()))
    assert not close(got, plain)

    cfg = run_merge(tmp_path, paths, "emr", method="emr", sparsify={"kind": "tadrop"})
    ref = merge_state_dicts(build_spec(cfg), base_sd, tasks)
    export_task(tmp_path / "emr", "b", tmp_path / "task-b")
    got = logits(load(arch, tmp_path / "task-b"))
    want = logits(reference_model(arch, paths["base"], task_model(ref, base_sd, 1), tmp_path / "ref-emr"))
    assert close(got, want), (arch, float((got - want).abs().max()))
    assert not close(got, plain)
    assert json.loads((tmp_path / "task-b" / "config.json").read_text())["model_type"] == \
        json.loads((paths["base"] / "config.json").read_text())["model_type"]


@pytest.mark.slow
def test_fp16_base_with_bf16_finetunes(tmp_path):
    """The rule (README, Inputs): tau_k = float32(theta_k) - float32(theta_0) whatever the input dtypes;
    the output has the base's dtype unless output_dtype says otherwise."""
    paths = family(tmp_path, "llama", dtypes=(torch.float16, torch.bfloat16, torch.bfloat16))
    cfg = run_merge(tmp_path, paths, "ties", method="ties")
    out = state_dict(tmp_path / "ties" / "merged")
    base_sd = state_dict(paths["base"])
    ref = merge_state_dicts(build_spec(cfg), base_sd, [state_dict(paths[n]) for n in ("a", "b")])
    for name, t in out.items():
        assert t.dtype == torch.float16, name
        assert torch.equal(t, ref.merged[name]), name
    got = logits(load("llama", tmp_path / "ties" / "merged").float())
    assert torch.isfinite(got).all()
