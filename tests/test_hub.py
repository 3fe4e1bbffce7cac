"""Hugging Face repo ids as inputs, resolved offline from a real cache layout (refs/, snapshots/
symlinked into blobs/); the resolved commit is part of the run's identity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.sources.hub import parse_repo_id

from conftest import run_cli, tree_digest
from tiny_hf import hf_cache


def cfg_file(path: Path, base, models: list[dict], out: Path, **kw) -> Path:
    cfg = {"base": str(base), "models": models, "output": str(out), "workers": 1, "memory_budget": "256MiB",
           "method": "ties", **kw}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture()
def cache(tmp_path, family):
    c = tmp_path / "hub"
    commits = {n: hf_cache(c, f"org/{n}", Path(p)) for n, p in family.items()}
    return c, commits


def env(cache_dir):
    return {"HF_HUB_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}


def test_parse_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_repo_id("meta-llama/Llama-3.1-8B") == ("meta-llama/Llama-3.1-8B", "main")
    assert parse_repo_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_repo_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    (tmp_path / "org" / "local").mkdir(parents=True)
    for not_ids in ("org/local", "./org/name", "/abs/name", "a/b/c", "name", "~/x/y"):
        assert parse_repo_id(not_ids) is None, not_ids


@pytest.mark.slow
def test_repo_ids_merge_like_paths(tmp_path, family, cache):
    c, _ = cache
    names = [n for n in family if n != "base"]
    by_path = cfg_file(tmp_path / "p.yaml", family["base"], [{"name": n, "path": str(family[n])} for n in names],
                       tmp_path / "by-path")
    by_id = cfg_file(tmp_path / "i.yaml", "org/base", [{"name": n, "path": f"org/{n}"} for n in names],
                     tmp_path / "by-id")
    run_cli("merge", by_path, check=True)
    run_cli("merge", by_id, check=True, env_extra=env(c))
    by_id_tree, by_path_tree = tree_digest(tmp_path / "by-id"), tree_digest(tmp_path / "by-path")
    # the model card names the inputs as the config gave them (a repo id here, a path there)
    assert "org/base" in (tmp_path / "by-id" / "merged" / "README.md").read_text()
    by_id_tree.pop("merged/README.md"), by_path_tree.pop("merged/README.md")
    assert by_id_tree == by_path_tree
    record = json.loads((tmp_path / "by-id" / "run.json").read_text())
    assert record["config"]["base"] == "org/base"
    snap = record["inputs"]["base"]["@snapshot"]
    assert snap["repo_id"] == "org/base" and snap["revision"] == "main" and len(snap["commit"]) == 40


@pytest.mark.slow
def test_revision_by_branch_and_commit(tmp_path, family, cache):
    c, commits = cache
    names = [n for n in family if n != "base"]
    other = hf_cache(c, "org/base", Path(family[names[0]]), commit="b" * 40, ref="experimental")
    for rev, want in (("experimental", other), (commits["base"], commits["base"])):
        out = tmp_path / f"run-{rev[:8]}"
        run_cli("merge", cfg_file(tmp_path / "c.yaml", f"org/base@{rev}", [{"name": names[1], "path": f"org/{names[1]}"}],
                                  out), check=True, env_extra=env(c))
        assert json.loads((out / "run.json").read_text())["inputs"]["base"]["@snapshot"]["commit"] == want


def test_missing_repo_id_is_one_line_naming_id_revision_and_cache(tmp_path, family, cache):
    c, _ = cache
    proc = run_cli("merge", cfg_file(tmp_path / "c.yaml", "org/base", [{"name": "x", "path": "org/nope@v9"}],
                                     tmp_path / "run"), env_extra=env(c))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "'org/nope'" in line and "'v9'" in line and str(c) in line and "model 'x'" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cache_update_between_crash_and_resume_is_detected(tmp_path, family, cache):
    c, commits = cache
    names = [n for n in family if n != "base"]
    path = cfg_file(tmp_path / "c.yaml", "org/base", [{"name": n, "path": f"org/{n}"} for n in names], tmp_path / "run")
    crashed = run_cli("merge", path, env_extra={**env(c), "TADROP_FAULT": "after_job:2"})
    assert crashed.returncode != 0
    # the same files under a new commit: only the snapshot moved, yet the run must not continue over it
    hf_cache(c, f"org/{names[0]}", Path(family[names[0]]), commit="c" * 40)
    proc = run_cli("merge", path, env_extra=env(c))
    assert proc.returncode == 1
    assert f"input {names[0]}.@snapshot.commit" in proc.stderr and "c" * 40 in proc.stderr


# -- download: true, through a local stand-in for the Hub's HTTP API ----------------------------------

class FakeHub:
    """The Hub's public REST API for one repo at one commit, served from a local thread: repo info
    (/api/models/{id}/revision/{rev}), the file tree (/api/models/{id}/tree/{rev}) and file
    resolution (HEAD/GET /{id}/resolve/{rev}/{file}); huggingface_hub is pointed at it with
    HF_ENDPOINT, so the real download path runs, and nothing leaves the machine. Logs every request."""

    def __init__(self, repo_id: str, files: dict[str, bytes], commit: str = "f" * 40):
        import hashlib
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import unquote, urlparse
        self.repo_id, self.files, self.commit, self.requests = repo_id, files, commit, []
        hub = self

        def entry(name, data):
            e = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if name.endswith((".safetensors", ".bin", ".msgpack")):      # LFS files, as on the Hub
                e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            return e

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body=b"", headers=(), head=False):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, obj, head=False):
                self._send(200, json.dumps(obj).encode(), [("Content-Type", "application/json")], head)

            def _route(self, head):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                api = f"/api/models/{hub.repo_id}/"
                if path.startswith(api + "revision/"):
                    return self._json({"id": hub.repo_id, "modelId": hub.repo_id, "sha": hub.commit,
                                       "private": False, "siblings": [{"rfilename": f} for f in hub.files]}, head)
                if path.startswith(api + "tree/"):
                    return self._json([entry(n, d) for n, d in hub.files.items()], head)
                res = f"/{hub.repo_id}/resolve/"
                if path.startswith(res):
                    name = path[len(res):].split("/", 1)[1]
                    if name in hub.files:
                        data = hub.files[name]
                        e = entry(name, data)
                        etag = e["lfs"]["oid"] if "lfs" in e else e["oid"]
                        return self._send(200, data, [("X-Repo-Commit", hub.commit), ("ETag", f'"{etag}"'),
                                                      ("X-Linked-Etag", f'"{etag}"'),
                                                      ("X-Linked-Size", str(len(data)))], head)
                self._send(404, b'{"error": "Repository not found"}',
                           [("Content-Type", "application/json"), ("X-Error-Code", "RepoNotFound")], head)

            def do_GET(self):
                self._route(False)

            def do_HEAD(self):
                self._route(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def online_env(cache_dir: Path, endpoint: str) -> dict:
    return {"HF_HUB_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint,
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": ""}


@pytest.mark.slow
def test_download_fetches_only_safetensors_config_and_tokenizer(tmp_path, family):
    base_dir = Path(family["base"])
    files = {p.name: p.read_bytes() for p in sorted(base_dir.iterdir()) if p.is_file()}
    assert "model.safetensors" in files and "config.json" in files
    files.update({"pytorch_model.bin": b"pickle: must never be fetched", "flax_model.msgpack": b"no",
                  "tokenizer.json": b'{"model": {"vocab": {}}}', "README.md": b"# card"})
    names = [n for n in family if n != "base"]
    models = [{"name": n, "path": str(family[n])} for n in names]
    cache = tmp_path / "hub"
    with FakeHub("org/remote-base", files) as hub:
        # downloads are off unless the config allows them: one line saying so, nothing fetched
        off = run_cli("merge", cfg_file(tmp_path / "off.yaml", "org/remote-base", models, tmp_path / "off"),
                      env_extra=online_env(cache, hub.endpoint))
        assert off.returncode == 1 and "download: true" in off.stderr and "'org/remote-base'" in off.stderr
        assert not any("/resolve/" in r for r in hub.requests)
        run_cli("merge", cfg_file(tmp_path / "on.yaml", "org/remote-base", models, tmp_path / "on", download=True),
                check=True, env_extra=online_env(cache, hub.endpoint))
        fetched = sorted(r.rsplit("/", 1)[1] for r in hub.requests if r.startswith("GET") and "/resolve/" in r)
    assert not any(r.endswith((".bin", ".msgpack", ".md")) for r in hub.requests), hub.requests
    wanted = {n for n in files if n.endswith((".safetensors", ".json"))}
    assert set(fetched) == wanted and "tokenizer.json" in wanted, fetched
    snap = cache / "models--org--remote-base" / "snapshots" / hub.commit
    assert (snap / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert not (snap / "pytorch_model.bin").exists() and not (snap / "flax_model.msgpack").exists()
    record = json.loads((tmp_path / "on" / "run.json").read_text())
    assert record["inputs"]["base"]["@snapshot"] == {"repo_id": "org/remote-base", "revision": "main",
                                                     "commit": hub.commit}
    # the same merge from the base's directory gives the same bytes; offline, the cache now serves it
    run_cli("merge", cfg_file(tmp_path / "local.yaml", str(base_dir), models, tmp_path / "local"), check=True)
    got, want = tree_digest(tmp_path / "on"), tree_digest(tmp_path / "local")
    got.pop("merged/README.md"), want.pop("merged/README.md")
    got.pop("merged/tokenizer.json", None)        # the fake repo's extra tokenizer file
    assert got == want
    run_cli("merge", cfg_file(tmp_path / "again.yaml", "org/remote-base", models, tmp_path / "again"), check=True,
            env_extra={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})


def test_download_of_a_missing_repo_is_one_line(tmp_path, family):
    with FakeHub("org/other", {"config.json": b"{}"}) as hub:
        proc = run_cli("merge", cfg_file(tmp_path / "c.yaml", "org/absent@v2", [{"name": "x", "path": str(family["base"])}],
                                         tmp_path / "run", download=True),
                       env_extra=online_env(tmp_path / "hub", hub.endpoint))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    line = proc.stderr.strip()
    assert "'org/absent'" in line and "'v2'" in line and str(tmp_path / "hub") in line and "download failed" in line
    assert not (tmp_path / "run").exists()
