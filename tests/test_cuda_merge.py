"""`device: cuda` runs the same merge as the CPU: the same masks and kept counts, bit for bit, and
values within float rounding (the GPU sums in another order; README "GPU"). Skipped without a GPU;
`scripts/bench_gpu.py` runs it on one."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import tree_digest, write_config
from pipeline.config import load_config
from pipeline.run import merge

CASES = {
    "emr_tadrop": dict(method="emr", sparsify={"kind": "tadrop"}),
    "ties": dict(method="ties"),
    "ties_tadrop": dict(method="ties", sparsify={"kind": "tadrop"}),
    "tall": dict(method="tall_masks", tall={"default_lambda": 0.4}),
    "consensus": dict(method="consensus", sparsify={"kind": "tadrop"}),
}
EXACT_STATS = ("tensor", "task", "numel", "q_a", "q_b", "drop_rate", "kept")


def compare_runs(a: Path, b: Path, what: str) -> None:
    """Same files; mask stores and the exact columns of the drop table equal; values within 2 ulp
    of the output dtype (bf16 here), the norms within 1e-9 relative."""
    da, db = tree_digest(a), tree_digest(b)
    assert set(da) == set(db), what
    masks = [k for k in da if k.startswith("masks.zarr")]
    assert [k for k in masks if da[k] != db[k]] == [], f"{what}: mask chunks differ"
    ta, tb = pq.read_table(a / "stats.parquet"), pq.read_table(b / "stats.parquet")
    for col in EXACT_STATS:
        assert ta.column(col).to_pylist() == tb.column(col).to_pylist(), f"{what}: stats.{col}"
    for col in ("norm_before", "norm_after"):          # None where the sparsifier keeps no norms
        xa, xb = ta.column(col).to_pylist(), tb.column(col).to_pylist()
        assert [v is None for v in xa] == [v is None for v in xb], f"{what}: stats.{col}"
        x, y = (torch.tensor([v for v in c if v is not None], dtype=torch.float64) for c in (xa, xb))
        torch.testing.assert_close(x, y, rtol=1e-9, atol=0, msg=f"{what}: stats.{col}")
    for f in (k for k in da if k.endswith(".safetensors")):
        sa, sb = load_file(str(a / f)), load_file(str(b / f))
        assert set(sa) == set(sb), f"{what}/{f}"
        for name, x in sa.items():
            y = sb[name]
            assert x.dtype == y.dtype and x.shape == y.shape, f"{what}/{f}/{name}"
            eps = torch.finfo(x.dtype).eps
            torch.testing.assert_close(y.float(), x.float(), rtol=2 * eps, atol=1e-12,
                                       msg=f"{what}/{f}/{name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_merge_matches_cpu(tmp_path, family_bf16, case):
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = write_config(tmp_path / f"{device}.yaml", family_bf16, tmp_path / device,
                           device=device, output_dtype="bfloat16", **CASES[case])
        merge(load_config(cfg), quiet=True)
        runs[device] = tmp_path / device
    compare_runs(runs["cpu"], runs["cuda"], f"{case} cpu/cuda")


def test_compare_runs_catches_a_changed_mask_and_value(tmp_path, family_bf16):
    """The comparison above is not vacuous: two CPU runs pass it, a flipped mask bit or a value
    moved by a few ulp fails it."""
    import zarr
    runs = []
    for i in range(2):
        cfg = write_config(tmp_path / f"{i}.yaml", family_bf16, tmp_path / f"r{i}",
                           output_dtype="bfloat16", **CASES["emr_tadrop"])
        merge(load_config(cfg), quiet=True)
        runs.append(tmp_path / f"r{i}")
    compare_runs(*runs, "cpu/cpu")

    unified = next((runs[1] / "unified").glob("*.safetensors"))
    sd = load_file(str(unified))
    name = next(n for n, v in sd.items() if v.dim() == 2)
    bumped = dict(sd)
    bumped[name] = sd[name].clone()
    bumped[name].view(torch.int16)[0, 0] += 8            # 8 ulp of bf16
    from safetensors.torch import save_file
    save_file(bumped, str(unified), metadata={"format": "pt"})
    with pytest.raises(AssertionError):
        compare_runs(*runs, "value moved")
    save_file(sd, str(unified), metadata={"format": "pt"})
    compare_runs(*runs, "restored")

    store = zarr.open_group(str(runs[1] / "masks.zarr"), mode="r+")
    arr = store[name]
    first = arr[(0,) * arr.ndim]
    arr[(0,) * arr.ndim] = not first
    with pytest.raises(AssertionError, match="mask"):
        compare_runs(*runs, "mask flipped")
