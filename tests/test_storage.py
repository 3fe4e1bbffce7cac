"""Storage accounting in run.json, `tadrop report` and the bank: bytes against K full checkpoints, mask
densities, and how many tasks keep each parameter."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.bank import TaskBank
from pipeline.checkpoints import Checkpoint
from pipeline.report import tensor_type, write_report
from pipeline.storage import dir_bytes, mask_counts, run_storage
from pipeline.writers import MaskStore

from test_bank import run_for


def test_storage_in_run_json_report_and_bank(tmp_path_factory, request):
    run = run_for(tmp_path_factory, request, "emr_tadrop", "family_bf16")
    family = request.getfixturevalue("family_bf16")
    rec = json.loads((run / "run.json").read_text())["storage"]
    names = [n for n in family if n != "base"]
    assert rec["tasks"] == len(names) == 4
    assert rec["checkpoints_bytes"] == sum((family[n] / "model.safetensors").stat().st_size for n in names)
    assert rec["base_bytes"] == (family["base"] / "model.safetensors").stat().st_size
    assert rec["unified_bytes"] == dir_bytes(run / "unified")
    assert rec["masks_bytes"] == dir_bytes(run / "masks.zarr")
    assert rec["compact_bytes"] == rec["base_bytes"] + rec["unified_bytes"] + rec["masks_bytes"]
    assert rec["ratio"] == pytest.approx(rec["checkpoints_bytes"] / rec["compact_bytes"])

    # the histogram and densities, recounted from the masks
    store = MaskStore.open(run / "masks.zarr", mode="r")
    hist: dict = {}
    kept = np.zeros(4, dtype=np.int64)
    for name in store.names():
        m = np.stack([store.read(name, k).reshape(-1) for k in range(4)])
        kept += m.sum(1)
        h = hist.setdefault(tensor_type(name), np.zeros(5, dtype=np.int64))
        h += np.bincount(m.sum(0), minlength=5)
    assert rec["keep_histogram"] == {t: v.tolist() for t, v in hist.items()}
    numel = sum(i.numel for n, i in Checkpoint.open(run / "unified", "u").tensors.items())
    assert rec["masked_params"] == numel == sum(sum(v) for v in rec["keep_histogram"].values())
    assert list(rec["mask_density"]) == names
    assert rec["mask_density"] == pytest.approx(dict(zip(names, (kept / numel).tolist())), rel=1e-12)
    # and they agree with the per-tensor densities of stats.parquet
    rows = pq.read_table(run / "stats.parquet").to_pylist()
    for t in names:
        rs = [r for r in rows if r["task"] == t]
        w = sum(r["mask_density"] * r["numel"] for r in rs) / sum(r["numel"] for r in rs)
        assert rec["mask_density"][t] == pytest.approx(w, rel=1e-9)

    assert run_storage(run, json.loads((run / "run.json").read_text())) == rec
    text = write_report(run)
    assert "storage:" in text and "catastrophic" in text and "base + unified + masks" in text
    assert f"{rec['ratio']:.2f}x" in text
    bank = TaskBank.open(run)
    assert bank.storage == rec
    assert "mask density per task" in bank.storage_report()


@pytest.mark.slow
def test_storage_of_single_model_method(tmp_path_factory, request):
    run = run_for(tmp_path_factory, request, "ta", "family")
    rec = json.loads((run / "run.json").read_text())["storage"]
    assert rec["compact"] == "merged" and rec["compact_bytes"] == dir_bytes(run / "merged")
    assert "keep_histogram" not in rec and rec["masks_bytes"] == 0
    assert "merged" in write_report(run)


@pytest.mark.parametrize("kw", [
    dict(method="tall_masks", memory_budget="64KiB"),                       # row-chunked: partial chunks
    dict(method="consensus", consensus={"k_min": 2}, memory_budget="64KiB"),
    dict(method="emr", sparsify={"kind": "tadrop", "scope": "model"}),      # model scope: masks in the last pass
], ids=["tall-chunked", "consensus-chunked", "emr-model-scope"])
def test_counts_taken_in_the_jobs_equal_a_recount_of_the_store(tmp_path, family, kw):
    """The reduce sums the counts each job took from its mask rows; reading the finished store back
    (`run_storage`, the path of runs made before the jobs counted) must give the same record."""
    from conftest import write_config
    from pipeline.config import load_config
    from pipeline.run import merge
    merge(load_config(write_config(tmp_path / "cfg.yaml", family, tmp_path / "run", **kw)), quiet=True)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    ledger = (tmp_path / "run" / ".tadrop" / "ledger.jsonl").read_text()
    assert '"mask_counts"' in ledger            # the jobs did count (else the reduce read the store)
    assert record["storage"]["masked_params"] > 0
    assert run_storage(tmp_path / "run", record) == record["storage"]


@pytest.mark.parametrize("shape", [(4, 70_001), (1, 3, 5), (7, 300, 300), (3,)])
def test_mask_counts_match_counting_by_hand(shape):
    """A job's counts (taken blockwise while the masks are in memory) against numpy's own counting."""
    masks = np.random.default_rng(sum(shape)).random(shape) < 0.4
    got = mask_counts(masks)
    flat = masks.reshape(shape[0], -1)
    assert got["kept"] == flat.sum(1).tolist()
    assert got["hist"] == np.bincount(flat.sum(0), minlength=shape[0] + 1).tolist()
    assert got["numel"] == flat.shape[1]
