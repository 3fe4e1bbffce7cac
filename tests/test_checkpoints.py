"""Our safetensors reader against files written by safetensors itself, corrupt files, and validation."""
from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.checkpoints import Checkpoint, CheckpointError, read_header, validate_inputs


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16.2d": torch.randn(7, 5, generator=g).bfloat16(),
        "b.f16.1d": torch.randn(9, generator=g).half(),
        "c.f32.0d": torch.tensor(3.25),
        "d.f32.3d": torch.randn(4, 3, 2, generator=g),
        "e.i64": torch.arange(12).reshape(3, 4),
        "f.bool": torch.rand(5, 3, generator=g) > 0.5,
        "g.f64": torch.randn(3, 3, generator=g, dtype=torch.float64),
        "h.i32.1d": torch.arange(5, dtype=torch.int32),
        "i.u8": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        "j.empty": torch.zeros(0, 4),
    }


@pytest.fixture()
def single(tmp_path) -> tuple[Path, dict]:
    sd = sample_tensors()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    return path, sd


def write_sharded(d: Path, sd: dict, groups: list[list[str]]) -> Path:
    """An HF sharded dir as transformers writes it: shards + model.safetensors.index.json."""
    d.mkdir(parents=True, exist_ok=True)
    wmap = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: sd[n] for n in names}, str(d / fname), metadata={"format": "pt"})
        wmap.update({n: fname for n in names})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                "weight_map": wmap}))
    return d


def test_views_equal_safetensors(single):
    path, sd = single
    ck = Checkpoint.open(path, "m")
    assert list(ck.tensors) == sorted(sd)
    with safe_open(str(path), "pt") as f:
        for name in sd:
            want = f.get_tensor(name)
            got = ck.view(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got, want), name
            info = ck.tensors[name]
            assert info.nbytes == want.numel() * want.element_size()
            assert info.file == path and ck.files == [path]


@pytest.mark.parametrize("name", ["a.bf16.2d", "b.f16.1d", "d.f32.3d", "e.i64", "f.bool", "h.i32.1d"])
def test_row_views(single, name):
    path, sd = single
    ck = Checkpoint.open(path, "m")
    t = sd[name]
    for r0, r1 in [(0, 1), (1, 3), (2, t.shape[0]), (0, t.shape[0]), (2, 2)]:
        assert torch.equal(ck.view(name, r0, r1), t[r0:r1]), (r0, r1)
    assert torch.equal(ck.view(name, 1), t[1:])


def test_views_are_zero_copy_of_one_map(single):
    path, _ = single
    ck = Checkpoint.open(path, "m")
    a, b = ck.view("d.f32.3d"), ck.view("d.f32.3d", 1, 2)
    assert b.data_ptr() == a.data_ptr() + 3 * 2 * 4
    assert len(ck._maps) == 1


def test_scalar_and_empty(single):
    path, _ = single
    ck = Checkpoint.open(path, "m")
    assert ck.view("c.f32.0d").shape == () and ck.view("c.f32.0d").item() == 3.25
    assert ck.view("c.f32.0d", 0, 1).tolist() == [3.25]
    assert ck.view("j.empty").shape == (0, 4)
    with pytest.raises(CheckpointError, match="out of range"):
        ck.view("b.f16.1d", 3, 10)
    with pytest.raises(CheckpointError, match="no tensor 'zzz'"):
        ck.view("zzz")


def test_pickle_reopens_lazily(single):
    path, sd = single
    ck = Checkpoint.open(path, "m")
    ck.view("a.bf16.2d")
    clone = pickle.loads(pickle.dumps(ck))
    assert clone._maps == {} and clone.name == "m"
    assert torch.equal(clone.view("a.bf16.2d", 2, 4), sd["a.bf16.2d"][2:4])


def test_close_and_release_keep_live_views_valid(single):
    path, sd = single
    ck = Checkpoint.open(path, "m")
    v = ck.view("d.f32.3d")
    ck.release("d.f32.3d")
    assert torch.equal(v, sd["d.f32.3d"])
    ck.close()
    assert torch.equal(v, sd["d.f32.3d"]) and torch.equal(ck.view("e.i64"), sd["e.i64"])


def test_sharded_dir(tmp_path):
    sd = sample_tensors()
    names = sorted(sd)
    d = write_sharded(tmp_path / "model", sd, [names[:4], names[4:7], names[7:]])
    (d / "config.json").write_text("{}")
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                  "spm.model", "merges.txt", "vocab.json", "chat_template.jinja", "README.md",
                  "pytorch_model.bin", "training_args.json"):
        (d / extra).write_text("x")
    ck = Checkpoint.open(d, "sharded")
    assert ck.root == d and len(ck.files) == 3 and ck.index_file == d / "model.safetensors.index.json"
    assert list(ck.tensors) == names
    for n in names:
        assert torch.equal(ck.view(n), sd[n]), n
    assert [p.name for p in ck.non_weight_files()] == [
        "chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
        "special_tokens_map.json", "spm.model", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    fp = ck.fingerprint()
    assert set(fp) == {f.name for f in ck.files} | {"model.safetensors.index.json"}
    assert all(set(v) == {"size", "mtime_ns", "header_sha256"} for v in fp.values())


def test_hf_single_file_dir(tmp_path):
    sd = sample_tensors()
    (tmp_path / "m").mkdir()
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    ck = Checkpoint.open(tmp_path / "m", "m")
    assert ck.files == [tmp_path / "m" / "model.safetensors"] and ck.index_file is None


def test_fingerprint_tracks_the_header(tmp_path, single):
    path, sd = single
    fp1 = Checkpoint.open(path, "m").fingerprint()[path.name]
    save_file({**sd, "extra": torch.zeros(1)}, str(path))
    fp2 = Checkpoint.open(path, "m").fingerprint()[path.name]
    assert fp1["header_sha256"] != fp2["header_sha256"] and fp1["size"] != fp2["size"]


# -- corrupt inputs: every error names the file ---------------------------------------------------------

def expect_error(path: Path, *fragments: str, opener=None) -> str:
    with pytest.raises(CheckpointError) as e:
        (opener or (lambda p: Checkpoint.open(p, "bad")))(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg.lower(), msg
    return msg


def raw_file(path: Path, header: dict, data: bytes, hlen: int | None = None) -> Path:
    js = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(js) if hlen is None else hlen) + js + data)
    return path


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nowhere", "no such file")


def test_not_a_safetensors_file(tmp_path):
    expect_error(tmp_path / "x.safetensors", opener=lambda p: (p.write_text("hello world, not a model\n"),
                                                              Checkpoint.open(p, "x")))
    p = tmp_path / "tiny.safetensors"
    p.write_bytes(b"abc")
    expect_error(p, "not a safetensors file")


def test_truncated(single):
    path, _ = single
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    msg = expect_error(path, "truncated")
    assert "tensor" in msg


def test_garbled_header(single):
    path, _ = single
    data = bytearray(path.read_bytes())
    data[8:20] = b"{{{{garbage!"
    path.write_bytes(bytes(data))
    expect_error(path, "header")


def test_header_length_past_end(single):
    path, _ = single
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) + 5) + data[8:])
    expect_error(path, "header length")
    path.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    expect_error(path, "absurd")


def test_overlapping_offsets(tmp_path):
    p = raw_file(tmp_path / "o.safetensors", {
        "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16))
    msg = expect_error(p, "overlap")
    assert "'x'" in msg and "'y'" in msg


def test_offsets_not_matching_shape(tmp_path):
    p = raw_file(tmp_path / "s.safetensors",
                 {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, bytes(16))
    assert "'x'" in expect_error(p, "needs 12")


def test_offsets_out_of_range(tmp_path):
    p = raw_file(tmp_path / "r.safetensors",
                 {"x": {"dtype": "F16", "shape": [8], "data_offsets": [8, 24]}}, bytes(16))
    expect_error(p, "truncated")
    p = raw_file(tmp_path / "n.safetensors",
                 {"x": {"dtype": "F16", "shape": [8], "data_offsets": [16, 0]}}, bytes(16))
    expect_error(p, "data_offsets")


def test_unknown_dtype(tmp_path):
    p = raw_file(tmp_path / "d.safetensors",
                 {"x": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}}, bytes(2))
    assert "'x'" in expect_error(p, "dtype 'f12'")


def test_header_not_an_object(tmp_path):
    expect_error(raw_file(tmp_path / "l.safetensors", [1, 2], b""), "corrupt header")
    expect_error(raw_file(tmp_path / "e.safetensors", {"x": {"dtype": "F32"}}, b""), "corrupt header")


def test_dir_without_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"x")
    expect_error(tmp_path / "m", "pytorch_model.bin", "convert")


def test_index_not_matching_shards(tmp_path):
    sd = sample_tensors()
    names = sorted(sd)
    d = write_sharded(tmp_path / "m", sd, [names[:5], names[5:]])
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][names[0]] = "model-00002-of-00002.safetensors"
    data["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    msg = expect_error(d / "model.safetensors.index.json", "index does not match", opener=lambda p:
                       Checkpoint.open(d, "m"))
    assert "ghost" in msg and names[0] in msg
    data["weight_map"] = {n: "missing.safetensors" for n in names}
    index.write_text(json.dumps(data))
    expect_error(d / "missing.safetensors", "no such file", opener=lambda p: Checkpoint.open(d, "m"))
    index.write_text("{not json")
    expect_error(index, "corrupt index", opener=lambda p: Checkpoint.open(d, "m"))


def test_read_header_metadata(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(2)}, str(p), metadata={"format": "pt"})
    tensors, meta, hlen = read_header(p)
    assert meta == {"format": "pt"} and list(tensors) == ["x"] and hlen % 8 == 0


# -- validate_inputs ------------------------------------------------------------------------------------

def family(tmp_path: Path, edits: dict[str, dict]) -> tuple[Checkpoint, list[Checkpoint]]:
    base = {"w1": torch.zeros(4, 3), "w2": torch.zeros(5).bfloat16(), "pos": torch.arange(4),
            "mask": torch.ones(2, dtype=torch.bool), "lm_head.weight": torch.zeros(6, 3)}
    save_file(base, str(tmp_path / "base.safetensors"))
    models = []
    for name, edit in edits.items():
        sd = {k: v.float() if v.is_floating_point() else v for k, v in base.items()}  # f32 fine-tunes
        for k, v in edit.items():
            if v is None:
                sd.pop(k)
            else:
                sd[k] = v
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        models.append(Checkpoint.open(tmp_path / f"{name}.safetensors", name))
    return Checkpoint.open(tmp_path / "base.safetensors", "base"), models


def test_validate_ok(tmp_path):
    base, models = family(tmp_path, {"math": {}, "code": {}})
    t = validate_inputs(base, models, ["lm_head.*"])
    assert t.merge == ["w1", "w2"]
    assert t.copy == ["lm_head.weight", "mask", "pos"]


def test_validate_passthrough_excuses_mismatches(tmp_path):
    base, models = family(tmp_path, {"math": {"lm_head.weight": None}, "code": {"lm_head.weight": torch.zeros(7, 3),
                                                                               "extra.bias": torch.zeros(2)}})
    t = validate_inputs(base, models, ["lm_head.weight", "extra.*"])
    assert "lm_head.weight" in t.copy and "extra.bias" not in t.merge + t.copy


@pytest.mark.parametrize("edit,frags", [
    ({"code": {"w1": None}}, ["'w1'", "missing", "code"]),
    ({"code": {"w1": torch.zeros(3, 4)}}, ["'w1'", "shape", "[4, 3]", "code [3, 4]"]),
    ({"math": {"w2": torch.zeros(5, dtype=torch.int32)}}, ["'w2'", "math i32", "integer"]),
    ({"math": {"pos": torch.zeros(4)}}, ["'pos'", "i64 in the base", "math f32"]),
    ({"code": {"new.weight": torch.zeros(2)}}, ["'new.weight'", "not in the base", "code", "passthrough"]),
])
def test_validate_errors(tmp_path, edit, frags):
    base, models = family(tmp_path, {"math": {}, "code": {}, **edit})
    with pytest.raises(CheckpointError) as e:
        validate_inputs(base, models, [])
    msg = str(e.value)
    assert str(tmp_path) in msg   # where the inputs are
    # the words that carry the meaning: the problem itself, without the paths (whose file names hold the
    # model names) and without the header that lists every model
    problem = re.sub(r"<dir>\S*", "<file>", msg.replace(str(tmp_path), "<dir>"))
    problem = problem.split("problem(s):", 1)[-1].lower()
    for f in frags:
        assert f.lower() in problem, msg


def test_validate_reports_many_problems_at_once(tmp_path):
    extra = {f"x{i:02d}": torch.zeros(1) for i in range(14)}
    base, models = family(tmp_path, {"math": {"w1": None, **extra}, "code": {"w2": torch.zeros(2)}})
    with pytest.raises(CheckpointError) as e:
        validate_inputs(base, models, [])
    msg = str(e.value)
    assert "16 problem(s)" in msg and "'w1'" in msg and "'w2'" in msg and "... and 6 more" in msg


def test_duplicate_tensor_in_header(tmp_path):
    js = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    p = tmp_path / "dup.safetensors"
    p.write_bytes(struct.pack("<Q", len(js)) + js + bytes(8))
    assert "'x'" in expect_error(p, "twice")


def test_input_changed_after_open_is_detected(single):
    path, sd = single
    ck = Checkpoint.open(path, "m")
    with open(path, "ab") as f:
        f.write(b"more")
    with pytest.raises(CheckpointError, match="size changed"):
        ck.view("a.bf16.2d")
