"""Hugging Face repo ids (`org/name[@revision]`) resolved to a local snapshot directory.

Resolution goes through huggingface_hub's own cache logic (refs/<revision> -> snapshots/<commit>/,
files symlinked into blobs/), so a model downloaded by `huggingface-cli download` or by
`from_pretrained` is found as is, with HF_HUB_OFFLINE=1 too. Only where the config allows it
(`download: true`) and the hub is reachable are missing files fetched, and then only safetensors,
config and tokenizer files, never `.bin` pickles.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints import CheckpointError

# org/name, optionally @revision (a branch, tag or commit hash); HF's own name rules
_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)"
                      r"(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9_./-]*))?$")
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model",
                  "*.tiktoken", "*.txt", "*.jinja"]
IGNORE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack",
                   "*.gguf", "*.onnx"]


class HubError(CheckpointError):
    """A repo id that cannot be resolved; one line naming the id, revision and cache."""


@dataclass(frozen=True)
class Snapshot:
    repo_id: str
    revision: str        # as the user wrote it ('main' when none)
    commit: str          # the resolved commit hash (the snapshot directory's name)
    path: Path

    def identity(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


def parse_repo_id(ref: str) -> tuple[str, str] | None:
    """(repo_id, revision) when `ref` reads as a repo id and is not an existing local path."""
    if not isinstance(ref, str) or ref.startswith((".", "/", "~")) or os.path.exists(ref):
        return None
    m = _REPO_RE.match(ref)
    if not m:
        return None
    return m.group("repo"), m.group("rev") or "main"


def cache_dir() -> Path:
    """The hub cache huggingface_hub uses: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
    (read at call time, so a test's or a user's environment applies without re-importing)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(ref: str, what: str, *, download: bool = False) -> Snapshot:
    """The local snapshot of repo id `ref` (`org/name[@revision]`); `what` names the model in errors."""
    parsed = parse_repo_id(ref)
    if parsed is None:
        raise HubError(f"{what}: {ref!r} is neither an existing path nor a repo id org/name[@revision]")
    repo_id, revision = parsed
    from huggingface_hub import snapshot_download   # lazily: plain paths never need it
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    cache = cache_dir()
    kw = dict(repo_id=repo_id, revision=revision, cache_dir=str(cache),
              allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    path = None
    try:
        path = snapshot_download(local_files_only=True, **kw)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError, ValueError):
        path = None
    if path is None and download and not _offline():
        try:
            path = snapshot_download(**kw)
        except (RepositoryNotFoundError, RevisionNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                OfflineModeIsEnabled, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HubError(f"{what}: repo id {repo_id!r} at revision {revision!r}: not in the cache "
                           f"{cache} and the download failed: {first}") from None
    if path is None:
        how = ("HF_HUB_OFFLINE=1 is set" if _offline() else
               "downloads are off: set `download: true` in the config" if not download else "")
        raise HubError(f"{what}: {ref!r} is no local path, and repo id {repo_id!r} at revision {revision!r} "
                       f"is not in the Hugging "
                       f"Face cache {cache} ({how}; or fetch it with `hf download {repo_id}"
                       f"{' --revision ' + revision if revision != 'main' else ''}`)")
    path = Path(path)
    return Snapshot(repo_id, revision, path.name, path)
