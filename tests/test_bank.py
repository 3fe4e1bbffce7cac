"""The task bank gives, for every task, the bytes `tadrop export` writes (SPEC section 6); `export --all`
writes every task in one pass over the inputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import bank as bank_mod
from pipeline.bank import BankError, TaskBank
from pipeline.checkpoints import Checkpoint
from pipeline.config import load_config
from pipeline.export import export_task, export_tasks
from pipeline.run import merge
from pipeline.writers import MaskStore
from tadrop import methods

from conftest import run_cli, tree_digest, write_config

transformers = pytest.importorskip("transformers")

TADROP = {"kind": "tadrop", "a": 0.5, "b": 0.95}
CASES = {
    "emr": dict(method="emr"),
    "emr_tadrop": dict(method="emr", sparsify=TADROP),
    "tall": dict(method="tall_masks", tall={"lambdas": {"task0": 0.3}, "default_lambda": 0.5}),
    "ta": dict(method="task_arithmetic", sparsify=TADROP),
    "emr_mask": dict(method="emr", sparsify=TADROP, emr={"tadrop": "mask"}),
}
IDS = torch.tensor([[1, 5, 9, 2, 33, 7, 11, 4]])


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    sd = {}
    for f in sorted(set(index["weight_map"].values())):
        sd.update(load_file(str(d / f)))
    return sd


def assert_same(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}/{name}: {g.dtype}{tuple(g.shape)}"
        # bytes, not values: -0.0 == 0.0 would hide a wrong sign of zero
        assert torch.equal(g.cpu().contiguous().reshape(-1).view(torch.uint8),
                           w.contiguous().reshape(-1).view(torch.uint8)), f"{what}/{name}"


_RUNS: dict = {}


def run_for(tmp_path_factory, request, case: str, fixture: str) -> Path:
    """One merged run per (case, family), shared by the tests of this file (read-only)."""
    key = (case, fixture)
    if key not in _RUNS:
        family = request.getfixturevalue(fixture)
        d = tmp_path_factory.mktemp(f"bank_{case}_{fixture}")
        merge(load_config(write_config(d / "cfg.yaml", family, d / "run", **CASES[case])), quiet=True)
        _RUNS[key] = d / "run"
    return _RUNS[key]


SLOW = pytest.mark.slow


@pytest.mark.parametrize("fixture,case", [
    ("family_bf16", "emr_tadrop"),
    *[pytest.param(f, c, marks=SLOW) for f in ("family", "family_bf16") for c in sorted(CASES)
      if (f, c) != ("family_bf16", "emr_tadrop") and c != "emr_mask"]])
def test_bank_equals_export(tmp_path, tmp_path_factory, request, case, fixture):
    run = run_for(tmp_path_factory, request, case, fixture)
    written = export_tasks(run, tmp_path / "all")
    bank = TaskBank.open(run)
    assert bank.tasks == list(written)
    for task, d in written.items():
        assert_same(bank.state_dict(task), load_dir(d), f"{case}/{fixture}/{task}")
    if case == "ta":
        assert bank.tasks == ["merged"]
        assert tree_digest(written["merged"]) == tree_digest(run / "merged")
        return

    # one live model switched between tasks holds each task's exported weights and logits
    first, second = bank.tasks[0], bank.tasks[-1]
    model = bank.model(first)
    ref = transformers.AutoModelForCausalLM.from_pretrained(written[second], dtype=model.dtype).eval()
    with torch.no_grad():
        before = model(IDS).logits
        bank.switch(model, second)
        assert bank.task_of(model) == second
        want = load_dir(written[second])
        assert_same({k: v for k, v in model.state_dict().items() if k in want}, want,
                    f"{case}/{fixture}/switched")
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
        assert not torch.equal(before, model(IDS).logits)
        bank.switch(model, first)
        assert torch.equal(model(IDS).logits, before)


def test_export_all_equals_single_exports(tmp_path, tmp_path_factory, request):
    run = run_for(tmp_path_factory, request, "emr_tadrop", "family_bf16")
    written = export_tasks(run, tmp_path / "all", shard_size=4096)
    for task, d in written.items():
        one = export_task(run, task, tmp_path / f"one_{task}", shard_size=4096)
        assert len(list(one.glob("model-*.safetensors"))) > 1
        assert tree_digest(d) == tree_digest(one), task


def _count_reads(monkeypatch) -> dict:
    """Bytes handed out by the real Checkpoint.view, per (checkpoint, tensor), and mask reads."""
    seen: dict = {}
    view, read = Checkpoint.view, MaskStore.read

    def counting_view(self, name, r0=None, r1=None):
        t = view(self, name, r0, r1)
        seen[(self.name, name)] = seen.get((self.name, name), 0) + t.numel() * t.element_size()
        return t

    def counting_read(self, name, k, r0=None, r1=None):
        a = read(self, name, k, r0, r1)
        seen[("mask", name, k)] = seen.get(("mask", name, k), 0) + a.size
        return a

    monkeypatch.setattr(Checkpoint, "view", counting_view)
    monkeypatch.setattr(MaskStore, "read", counting_read)
    return seen


def test_export_all_reads_each_input_once(tmp_path, tmp_path_factory, request, monkeypatch):
    run = run_for(tmp_path_factory, request, "emr_tadrop", "family_bf16")
    base = Checkpoint.open(request.getfixturevalue("family_bf16")["base"], "base")
    unified = Checkpoint.open(run / "unified", "unified")
    seen = _count_reads(monkeypatch)
    written = export_tasks(run, tmp_path / "all")
    k = len(written)
    assert k == 4
    for name, info in base.tensors.items():
        assert seen[("base", name)] == info.nbytes, name
    for name, info in unified.tensors.items():
        assert seen[("unified", name)] == info.nbytes, name
        for i in range(k):
            assert seen[("mask", name, i)] == info.numel, (name, i)
    # against K single exports, which read the base and unified vector K times
    seen.clear()
    for task in written:
        export_task(run, task, tmp_path / f"one_{task}")
    assert sum(v for (c, *_), v in seen.items() if c == "base") == k * sum(
        i.nbytes for i in base.tensors.values())


@pytest.mark.slow
def test_cli_export_all_and_subset(tmp_path, tmp_path_factory, request):
    run = run_for(tmp_path_factory, request, "tall", "family")
    proc = run_cli("export", run, "--all", "--output", tmp_path / "all", check=True)
    assert proc.stdout.count("wrote task") == 3
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["task0", "task1", "task2"]
    run_cli("export", run, "--task", "task2,task0", "--output", tmp_path / "sub", check=True)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["task0", "task2"]
    assert tree_digest(tmp_path / "sub" / "task2") == tree_digest(tmp_path / "all" / "task2")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sub" / "task0")
    assert_same(dict(model.state_dict()), load_dir(tmp_path / "all" / "task0"), "from_pretrained")

    bad = run_cli("export", run, "--task", "task0,nope", "--output", tmp_path / "bad")
    assert bad.returncode == 1 and "'nope'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
    both = run_cli("export", run, "--all", "--task", "task0", "--output", tmp_path / "bad")
    assert both.returncode == 2


def test_emr_tensor_scales_apply_to_export_and_bank(tmp_path, tmp_path_factory, request):
    """`emr.tadrop: mask` stores a per-tensor, per-task factor on lambda_k; export and bank apply it."""
    run = run_for(tmp_path_factory, request, "emr_mask", "family_bf16")
    store = MaskStore.open(run / "masks.zarr", mode="r")
    scales = store.attrs["emr_tensor_scales"]
    written = export_tasks(run, tmp_path / "all")
    bank = TaskBank.open(run)
    base_ck = Checkpoint.open(request.getfixturevalue("family_bf16")["base"], "base")
    uni_ck = Checkpoint.open(run / "unified", "unified")
    for k, (task, d) in enumerate(written.items()):
        got = load_dir(d)
        assert_same(bank.state_dict(task), got, f"emr_mask/{task}")
        name = "model.layers.0.mlp.down_proj.weight"
        lam = float(store.attrs["emr_lambdas"][task]) * float(scales[name][k])
        assert scales[name][k] != 1.0
        uni = uni_ck.view(name).float()
        mask = torch.from_numpy(store.read(name, k)).reshape(uni.shape)
        want = methods.emr_task_model(base_ck.view(name).float(), uni, mask, lam).to(torch.bfloat16)
        assert torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), task


def test_incomplete_run_refused_in_status_words(tmp_path, tmp_path_factory, request):
    src = run_for(tmp_path_factory, request, "emr_tadrop", "family_bf16")
    run = tmp_path / "run"
    shutil.copytree(src, run)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "complete": False}))
    status = run_cli("status", run)
    assert status.returncode == 3 and "incomplete" in status.stdout
    hint = "re-run the same `tadrop merge` command to continue"
    assert hint in status.stdout
    with pytest.raises(BankError, match="incomplete; re-run the same `tadrop merge` command"):
        TaskBank.open(run)
    proc = run_cli("export", run, "--all", "--output", tmp_path / "out")
    assert proc.returncode == 1 and hint in proc.stderr and not (tmp_path / "out").exists()


def test_bank_errors(tmp_path_factory, request):
    bank = TaskBank.open(run_for(tmp_path_factory, request, "emr_tadrop", "family_bf16"))
    with pytest.raises(BankError, match="'nope' is not in run"):
        bank.model("nope")
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64))
    with pytest.raises(BankError, match="has shape|is not in the"):
        bank.switch(other, "task0")


@pytest.mark.slow
def test_dtype_and_memory(tmp_path, tmp_path_factory, request):
    run = run_for(tmp_path_factory, request, "emr_tadrop", "family")
    exported = load_dir(export_task(run, "task1", tmp_path / "t1"))
    bank = TaskBank.open(run, dtype=torch.bfloat16)
    sd = bank.state_dict("task1")
    assert_same(sd, {k: v.to(torch.bfloat16) for k, v in exported.items()}, "bf16 cast")
    mem = bank.memory_bytes()
    n = sum(v.numel() for v in exported.values())
    merged = sum(v.numel() for k, v in exported.items() if k in bank._unified)
    assert mem["masks"] == sum(len(bank.tasks) * -(-bank._base[k].numel() // 8) for k in bank._unified)
    assert mem["base"] + mem["fixed"] == 4 * n and mem["unified"] == 4 * merged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fixture", ["family", "family_bf16"])
def test_cuda_bank_equals_export(tmp_path, tmp_path_factory, request, fixture):
    run = run_for(tmp_path_factory, request, "emr_tadrop", fixture)
    written = export_tasks(run, tmp_path / "all")
    bank = TaskBank.open(run, device="cuda")
    model = bank.model(bank.tasks[0])
    assert next(model.parameters()).is_cuda
    for task, d in written.items():
        bank.switch(model, task)
        want = load_dir(d)
        assert_same({k: v for k, v in model.state_dict().items() if k in want}, want, f"cuda/{fixture}/{task}")
        assert_same(bank.state_dict(task), load_dir(d), f"cuda/{fixture}/{task}/state_dict")


def test_block_boundaries_do_not_change_bits(tmp_path, tmp_path_factory, request, monkeypatch):
    """A block size that is not a divisor of any tensor (but a multiple of 8) gives the same bytes."""
    run = run_for(tmp_path_factory, request, "emr_tadrop", "family_bf16")
    want = TaskBank.open(run).state_dict("task3")
    monkeypatch.setattr(bank_mod, "BLOCK", 8 * 37)
    assert_same(TaskBank.open(run).state_dict("task3"), want, "small blocks")
