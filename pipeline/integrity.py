"""Trusting a run directory: one writer at a time, a checksum for every output, verify and repair.

- The run lock: `fcntl.flock` on `RUN/.tadrop/lock`, exclusive for writers (merge, tune), shared for
  readers (export, the task bank), plus one JSON record per holder in `RUN/.tadrop/holders/` naming
  its host, pid and start time. flock is authoritative on one host (the kernel drops it when the holder
  dies, so a dead holder's record is stale and taken over); a record naming another host is trusted,
  because flock may not reach across hosts on a network filesystem (see the README).
- Checksums (xxh3_64) are taken from the bytes while they are still in memory or in the page cache:
  each job's shard byte ranges and Zarr chunk files go into its ledger result; the reduce adds the
  index files, shard headers, Zarr metadata and stats.parquet, and stores the lot in `run.json`.
- `check_complete` compares presence and sizes (cheap: status, export, the bank); `verify` re-hashes
  everything and says which jobs produced what is damaged, so a re-run of the merge redoes exactly those.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import xxhash

log = logging.getLogger("tadrop")

STATE_DIR = ".tadrop"
LOCK_FILE = "lock"
HOLDERS_DIR = "holders"
ALGORITHM = "xxh3_64"
OUTPUTS = ("merged", "unified", "masks.zarr")
READ_BLOCK = 16 << 20
HOST = socket.gethostname()


# -- hashing ---------------------------------------------------------------------------------------------
def hash_bytes(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def hash_file(path: str | os.PathLike, offset: int = 0, length: int | None = None,
              algorithm=xxhash.xxh3_64) -> str:
    """Hash `length` bytes of a file from `offset` (to the end when None); a short file hashes short."""
    h = algorithm()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            block = f.read(READ_BLOCK if left is None else min(READ_BLOCK, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


def file_entry(path: Path) -> list:
    """[size, hash] of a whole (small) file."""
    data = path.read_bytes()
    return [len(data), hash_bytes(data)]


# -- JSON state files -------------------------------------------------------------------------------------
class StateError(RuntimeError):
    """A state file of the run (run.json, plan.json) is unreadable; the message names it."""


def read_json(path: Path, what: str = "") -> dict:
    """A JSON object from `path`, or StateError naming the file (missing, corrupt, nested too deep)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise StateError(f"{path}: missing{what}") from None
    except (OSError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
        raise StateError(f"{path}: unreadable{what} ({reason})") from None
    if not isinstance(data, dict):
        raise StateError(f"{path}: corrupt{what} (JSON {type(data).__name__}, expected an object)")
    return data


# -- the run lock ------------------------------------------------------------------------------------------
class LockError(RuntimeError):
    """Another process holds the run (a second writer, or a writer while readers read)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(rec: dict) -> str:
    return (f"{rec.get('command', '?')} (pid {rec.get('pid')}, host {rec.get('host')}, "
            f"since {rec.get('started', '?')})")


def holders(run_dir: Path) -> list[dict]:
    """The lock records of a run (each with its `path`), oldest first; unreadable ones skipped."""
    d = Path(run_dir) / STATE_DIR / HOLDERS_DIR
    out = []
    try:
        files = sorted(d.iterdir())
    except OSError:
        return []
    for f in files:
        if not f.name.endswith(".json"):
            continue
        try:
            rec = json.loads(f.read_text())
            if isinstance(rec, dict):
                out.append({**rec, "path": str(f)})
        except (OSError, ValueError, RecursionError):
            continue
    return sorted(out, key=lambda r: str(r.get("started", "")))


def running_writer(run_dir: Path) -> dict | None:
    """The record of a writer that looks alive: same host and a live pid, or any other host
    (which this machine cannot check). For `tadrop status`."""
    for rec in holders(run_dir):
        if rec.get("mode") != "exclusive":
            continue
        if rec.get("host") != HOST or (isinstance(rec.get("pid"), int) and _alive(rec["pid"])):
            return rec
    return None


class RunLock:
    """flock on RUN/.tadrop/lock plus a record of who holds it. Use as a context manager.

    exclusive=True for writers (merge, tune), False for readers (export, bank: they may share).
    """

    def __init__(self, run_dir: str | os.PathLike, *, exclusive: bool, command: str):
        self.run_dir = Path(run_dir)
        self.exclusive, self.command = exclusive, command
        self._fd: int | None = None
        self._record: Path | None = None

    @property
    def state(self) -> Path:
        return self.run_dir / STATE_DIR

    def acquire(self) -> "RunLock":
        path = self.state / LOCK_FILE
        try:
            self.state.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if self.exclusive or e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise LockError(f"{path}: cannot open the run lock: {e.strerror or e}") from None
            # a read-only run directory: no writer can be at work in it, so a reader needs no lock
            log.warning("%s is read-only: reading without a lock", self.run_dir)
            return self
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            busy = [r for r in holders(self.run_dir) if self.exclusive or r.get("mode") == "exclusive"]
            who = "; ".join(_describe(r) for r in busy) or "another process (it left no record)"
            raise LockError(f"run {self.run_dir} is in use by {who}: "
                            + ("wait for it to finish; only one writer at a time"
                               if self.exclusive else "wait for the writer to finish")) from None
        except OSError as e:
            os.close(fd)
            raise LockError(f"{path}: cannot lock ({e.strerror or e}); this filesystem may not "
                            "support locks (see the README, shared filesystems)") from None
        self._fd = fd
        try:
            self._check_records()
            self._write_record()
        except BaseException:
            self.release()
            raise
        return self

    def _check_records(self) -> None:
        """We hold the flock. Same-host records that conflict are stale (flock is authoritative on one
        host: their process is gone or no longer holds it); other hosts' records are trusted."""
        for rec in holders(self.run_dir):
            conflicts = self.exclusive or rec.get("mode") == "exclusive"
            if not conflicts:
                continue
            if rec.get("host") == HOST:
                pid = rec.get("pid")
                state = "still running but no longer holding it" if isinstance(pid, int) and _alive(pid) \
                    else "no longer running"
                log.warning("taking over the stale lock of %s: %s", _describe(rec), state)
                Path(rec["path"]).unlink(missing_ok=True)
                continue
            raise LockError(
                f"run {self.run_dir} is locked by {_describe(rec)}, on another host: this machine cannot "
                f"check that process, and file locks may not reach across hosts on this filesystem. "
                f"If it has stopped, delete {rec['path']} and retry")

    def _write_record(self) -> None:
        d = self.state / HOLDERS_DIR
        d.mkdir(exist_ok=True)
        rec = {"host": HOST, "pid": os.getpid(), "command": self.command,
               "mode": "exclusive" if self.exclusive else "shared",
               "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = d / f"{HOST}-{os.getpid()}.json"
        tmp = d / f".{path.name}.tmp"
        tmp.write_text(json.dumps(rec) + "\n")
        os.replace(tmp, path)
        self._record = path

    def release(self) -> None:
        if self._record is not None:
            self._record.unlink(missing_ok=True)
            self._record = None
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lock(run_dir: str | os.PathLike, command: str) -> RunLock:
    """A shared lock for a reader of a complete run (export, the task bank)."""
    return RunLock(run_dir, exclusive=False, command=command)


# -- checksums of a run's outputs ------------------------------------------------------------------------
def job_checksums(results: dict) -> dict:
    """The per-job checksums in ledger results, gathered by output:
    {"merged"|"unified": {tensor: [file, offset, nbytes, hash, job]}, "masks": {tensor: {...}}}."""
    out: dict[str, dict] = {"merged": {}, "unified": {}, "masks": {}}
    for job_id, res in results.items():
        sums = res.get("checksums") if isinstance(res, dict) else None
        if not sums:
            continue
        tensor = job_id.split(":", 1)[1]
        for kind in ("merged", "unified"):
            if sums.get(kind):
                out[kind][tensor] = [*sums[kind], job_id]
        if sums.get("masks"):
            out["masks"][tensor] = {**sums["masks"], "job": job_id}
    return out


def output_checksums(run_dir: Path, results: dict, shard_files: dict[str, Iterable[tuple[str, int, int]]],
                     mask_arrays: Iterable[str]) -> dict:
    """Everything the reduce published, for run.json: the jobs' checksums plus shard headers, index
    files, copied non-weight files, Zarr metadata and stats.parquet (all small, hashed here).

    shard_files: output -> [(file name, file size, header length)]; mask_arrays: Zarr array keys."""
    sums = job_checksums(results)
    shards, files = {}, {}
    for out, entries in shard_files.items():
        d = run_dir / out
        for name, size, header_len in entries:
            shards[f"{out}/{name}"] = [size, header_len, hash_file(d / name, 0, header_len)]
        if d.is_dir():
            weights = {name for name, _, _ in entries}
            for p in sorted(d.iterdir()):
                if p.is_file() and p.name not in weights:
                    files[f"{out}/{p.name}"] = file_entry(p)
    masks = run_dir / "masks.zarr"
    if masks.is_dir():
        files["masks.zarr/zarr.json"] = file_entry(masks / "zarr.json")
        for key in mask_arrays:
            files[f"masks.zarr/{key}/zarr.json"] = file_entry(masks / key / "zarr.json")
    if (run_dir / "stats.parquet").is_file():
        files["stats.parquet"] = file_entry(run_dir / "stats.parquet")
    return {"algorithm": ALGORITHM, "shards": shards, "files": files, **sums}


@dataclass
class Report:
    """What verify / check_complete found: problems (one line each) and the jobs that must be redone."""

    problems: list[str] = field(default_factory=list)
    jobs: set[str] = field(default_factory=set)
    checked: int = 0          # items compared
    hashed_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str, jobs: Iterable[str] = ()) -> None:
        self.problems.append(problem)
        self.jobs.update(jobs)

    def summary(self, limit: int = 10) -> str:
        lines = self.problems[:limit]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more")
        return "\n  ".join(lines)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def check_outputs(sums: dict, dirs: dict[str, Path], *, deep: bool, report: Report | None = None) -> Report:
    """Compare outputs with their checksums. dirs: output name ('merged', 'unified', 'masks.zarr', '')
    -> directory holding it. deep=False: presence and sizes only; deep=True: re-hash every byte."""
    rep = report or Report()
    ranges_by_file: dict[str, list[tuple[str, list]]] = {}
    for out in ("merged", "unified"):
        for tensor, entry in sums.get(out, {}).items():
            ranges_by_file.setdefault(f"{out}/{entry[0]}", []).append((tensor, entry))

    def where(rel: str) -> Path:
        top, _, rest = rel.partition("/")
        return dirs.get(top, dirs[""] / top) / rest if rest else dirs[""] / top

    bad_files: set[str] = set()
    for rel, (size, header_len, header_hash) in sums.get("shards", {}).items():
        p = where(rel)
        jobs = [e[4] for _, e in ranges_by_file.get(rel, [])]
        have = _size(p)
        rep.checked += 1
        if have is None:
            rep.add(f"{rel}: missing", jobs)
        elif have != size:
            rep.add(f"{rel}: {have} bytes, expected {size}", jobs)
        elif deep and hash_file(p, 0, header_len) != header_hash:
            rep.add(f"{rel}: header damaged (checksum)", jobs)
        else:
            continue
        bad_files.add(rel)
    for rel, entries in sorted(ranges_by_file.items()):
        if rel in bad_files:
            continue
        p = where(rel)
        have = _size(p)
        for tensor, (_, offset, nbytes, digest, job) in sorted(entries):
            rep.checked += 1
            if have is None:
                rep.add(f"{rel}: missing (tensor {tensor!r})", [job])
            elif have < offset + nbytes:
                rep.add(f"{rel}: truncated at {have} bytes (tensor {tensor!r} ends at {offset + nbytes})", [job])
            elif deep:
                rep.hashed_bytes += nbytes
                if hash_file(p, offset, nbytes) != digest:
                    rep.add(f"{rel}: tensor {tensor!r} damaged (checksum)", [job])
    for tensor, entry in sorted(sums.get("masks", {}).items()):
        top = dirs.get("masks.zarr", dirs[""] / "masks.zarr") / entry["array"]
        for key, (size, digest) in sorted(entry["chunks"].items()):
            rep.checked += 1
            p = top / key
            have = _size(p)
            rel = f"masks.zarr/{entry['array']}/{key}"
            if have is None:
                rep.add(f"{rel}: missing (mask of tensor {tensor!r})", [entry["job"]])
            elif have != size:
                rep.add(f"{rel}: {have} bytes, expected {size} (mask of tensor {tensor!r})", [entry["job"]])
            elif deep:
                rep.hashed_bytes += size
                if hash_file(p) != digest:
                    rep.add(f"{rel}: damaged (checksum; mask of tensor {tensor!r})", [entry["job"]])
    array_jobs = {e["array"]: e["job"] for e in sums.get("masks", {}).values()}
    for rel, (size, digest) in sorted(sums.get("files", {}).items()):
        rep.checked += 1
        p = where(rel)
        parts = rel.split("/")
        # an array's own metadata rebuilt means its chunks are rewritten: that tensor's job is redone
        jobs = [array_jobs[parts[1]]] if parts[0] == "masks.zarr" and len(parts) == 3 \
            and parts[1] in array_jobs else []
        have = _size(p)
        if have is None:
            rep.add(f"{rel}: missing", jobs)
        elif have != size:
            rep.add(f"{rel}: {have} bytes, expected {size}", jobs)
        elif deep:
            rep.hashed_bytes += size
            if hash_file(p) != digest:
                rep.add(f"{rel}: damaged (checksum)", jobs)
    return rep


def _load_record(run_dir: Path) -> dict:
    rec = read_json(run_dir / "run.json", " (run.json)")
    if "run_id" not in rec:
        raise StateError(f"{run_dir / 'run.json'}: not a tadrop run record (no run_id)")
    return rec


def _published_dirs(run_dir: Path) -> dict[str, Path]:
    return {"": run_dir, **{o: run_dir / o for o in OUTPUTS}}


def check_complete(run_dir: str | os.PathLike) -> Report:
    """Cheap: the run is complete and every recorded output is present with its size.
    For status, export and the task bank (which must never serve a missing file or chunk)."""
    run_dir = Path(run_dir)
    rec = _load_record(run_dir)
    rep = Report()
    if not rec.get("complete"):
        rep.add(f"{run_dir}: the run is not complete")
        return rep
    sums = rec.get("checksums")
    if not isinstance(sums, dict):
        return rep  # a run made before checksums: nothing to compare with
    try:
        return check_outputs(sums, _published_dirs(run_dir), deep=False, report=rep)
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"{run_dir / 'run.json'}: corrupt checksums ({type(e).__name__}: {e})") from None


def verify(run_dir: str | os.PathLike, *, inputs: bool = False, hash_inputs: bool = False) -> Report:
    """Full: re-hash every output byte against run.json (a complete run) or the ledger (an incomplete
    one: the finished jobs' partial outputs). inputs=True also compares the inputs' fingerprints
    (size, mtime, header); hash_inputs=True re-hashes them against hashes recorded by --verify-inputs."""
    run_dir = Path(run_dir)
    rec = _load_record(run_dir)
    rep = Report()
    try:
        if rec.get("complete"):
            sums = rec.get("checksums")
            if not isinstance(sums, dict):
                rep.add(f"{run_dir / 'run.json'}: no checksums recorded (a run made before checksums)")
            else:
                check_outputs(sums, _published_dirs(run_dir), deep=True, report=rep)
        else:
            from .ledger import Ledger
            state = run_dir / STATE_DIR
            results = Ledger(state / "ledger.jsonl").done()
            dirs = {"": run_dir, "merged": state / "merged.partial", "unified": state / "unified.partial",
                    "masks.zarr": state / "masks.zarr.partial"}
            check_outputs(job_checksums(results), dirs, deep=True, report=rep)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise StateError(f"{run_dir}: corrupt checksums ({type(e).__name__}: {e})") from None
    if inputs or hash_inputs:
        check_inputs(rec, rep, hash_inputs=hash_inputs)
    return rep


# -- inputs ------------------------------------------------------------------------------------------------
def input_files(config: dict) -> dict[str, Path]:
    """label ('base/model.safetensors', 'math/model.safetensors' ...) -> path, from a run's config."""
    from .sources import open_recorded
    out = {}
    entries = [("base", config["base"]), *[(m["name"], m.get("path") or m.get("adapter")) for m in config["models"]]]
    for name, path in entries:
        ck = open_recorded(path, name)
        index = getattr(ck, "index_file", None)
        for f in ck.files + ([index] if index else []):
            out[f"{name}/{f.name}"] = f
    return out


def hash_inputs(config: dict) -> dict[str, str]:
    """xxh3_128 of every input weight file and index (reads all the inputs once)."""
    return {label: hash_file(p, algorithm=xxhash.xxh3_128) for label, p in input_files(config).items()}


def check_inputs(rec: dict, rep: Report, *, hash_inputs: bool) -> None:
    """Compare the inputs with what the run recorded: fingerprints always, full hashes on request."""
    from .checkpoints import CheckpointError
    from .sources import fingerprint, open_recorded
    cfg = rec.get("config", {})
    fps = rec.get("inputs", {})
    entries = [("base", cfg.get("base")), *[(m.get("name"), m.get("path") or m.get("adapter"))
                                            for m in cfg.get("models", [])]]
    for name, path in entries:
        try:
            now = fingerprint(open_recorded(path, name))
        except (CheckpointError, OSError) as e:
            rep.add(f"input {name}: {e}")
            continue
        for fname, fp in sorted(fps.get(name, {}).items()):
            got = now.get(fname)
            if got != fp:
                what = "missing" if got is None else ", ".join(
                    k for k in ("size", "mtime_ns", "header_sha256", "sha256", "commit")
                    if isinstance(got, dict) and isinstance(fp, dict) and got.get(k) != fp.get(k)) or "changed"
                rep.add(f"input {name}/{fname}: changed since the merge ({what})")
    if hash_inputs:
        want = rec.get("input_hashes")
        if not want:
            rep.add("inputs: no hashes recorded (merge with --verify-inputs to record them)")
            return
        t = time.time()
        for label, path in input_files(cfg).items():
            if label not in want:
                continue
            rep.hashed_bytes += _size(path) or 0
            if hash_file(path, algorithm=xxhash.xxh3_128) != want[label]:
                rep.add(f"input {label}: content changed since the merge (checksum)")
        log.info("hashed the inputs in %.1f s", time.time() - t)


def changed_inputs(checkpoints: Iterable[Any]) -> list[str]:
    """Input files whose size or mtime changed since they were opened (after a worker died: a truncated
    input kills a worker with SIGBUS, which is not a memory problem)."""
    out = []
    for ck in checkpoints:
        for f, size in getattr(ck, "_sizes", {}).items():
            now = _size(Path(f))
            if now != size:
                out.append(f"{f} (model {ck.name!r}): " + ("deleted" if now is None else
                                                           f"size changed from {size} to {now}"))
    return out


# -- resume and repair -----------------------------------------------------------------------------------
PUBLISHED = (("merged.partial", "merged"), ("unified.partial", "unified"), ("masks.zarr.partial", "masks.zarr"))


def lost_jobs(plan, state: Path, done: dict) -> dict[str, str]:
    """Finished jobs (in the ledger) whose partial outputs are gone: a shard file missing, resized or
    with another header (it would be recreated empty), a mask array or chunk missing or resized, a
    model-scope histogram file missing. Cheap: stats and shard headers only. -> {job id: why}."""
    from .writers import _shard_ok
    lost: dict[str, str] = {}
    for out, sp in (("merged", plan.merged_plan), ("unified", plan.unified_plan)):
        if sp is None:
            continue
        copied = set(plan.copy)
        for shard in sp.shards:
            path = state / f"{out}.partial" / shard.filename
            if _shard_ok(path, shard):
                continue
            for t in shard.tensors:
                jid = f"copy:{t}" if out == "merged" and t in copied else f"merge:{t}"
                if jid in done:
                    lost[jid] = f"{out} shard {shard.filename} is missing or damaged"
    masks = state / "masks.zarr.partial"
    for jid, res in done.items():
        if not isinstance(res, dict):
            continue
        sums = (res.get("checksums") or {}).get("masks")
        if sums:
            top = masks / sums["array"]
            if not (top / "zarr.json").is_file():
                lost[jid] = f"mask array {sums['array']} is missing"
                continue
            for key, (size, _) in sums["chunks"].items():
                if _size(top / key) != size:
                    lost[jid] = f"mask chunk {sums['array']}/{key} is missing or resized"
                    break
        if jid.startswith("global_") and res.get("file") and not (state / res["file"]).is_file():
            lost[jid] = f"statistics file {res['file']} is missing"
    return lost


def unpublish(out_dir: Path, state: Path) -> None:
    """Move published outputs back under .tadrop/ (repair, or finishing an interrupted repair): the
    reduce publishes them again. Only called while the run is not complete and not reducing."""
    from .writers import fsync_dir
    moved = False
    for partial, published in PUBLISHED:
        src, dst = out_dir / published, state / partial
        if src.exists() and not dst.exists():
            src.rename(dst)
            moved = True
    if moved:
        fsync_dir(state)
        fsync_dir(out_dir)


def reopen(out_dir: Path, state: Path, ledger, report: Report) -> None:
    """Turn a damaged complete run back into an incomplete one that a merge finishes: invalidate the
    damaged jobs in the ledger, drop the reduce marker, clear `complete`, unpublish. Each step is
    durable before the next, so a crash anywhere leaves a run that the next merge repairs."""
    from .writers import atomic_write_json
    ledger.invalidate(report.jobs)
    (state / "reduce.json").unlink(missing_ok=True)
    record = read_json(out_dir / "run.json", " (run.json)")
    record["complete"] = False
    record.pop("finished", None)
    atomic_write_json(out_dir / "run.json", record)
    unpublish(out_dir, state)
    # metadata the reduce does not rewrite by itself: a damaged array's metadata is rebuilt (and that
    # tensor's job redone); a damaged group metadata file is rebuilt by the merge
    masks = state / "masks.zarr.partial"
    for p in report.problems:
        rel = p.split(":", 1)[0]
        parts = rel.split("/")
        if parts[0] == "masks.zarr" and parts[-1] == "zarr.json":
            target = masks.joinpath(*parts[1:])
            if len(parts) == 3:
                import shutil
                shutil.rmtree(target.parent, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)


def bytes_to_write(plan, out_dir: Path, state: Path, k: int) -> int:
    """What the run still has to write: shard files not yet allocated on disk, masks (one bit per
    parameter and task, bit-packed, plus chunk overheads), the stats table."""
    need = 0
    for out, sp in (("merged", plan.merged_plan), ("unified", plan.unified_plan)):
        if sp is None:
            continue
        for shard in sp.shards:
            have = 0
            for d in (state / f"{out}.partial", out_dir / out):
                try:
                    have = max(have, (d / shard.filename).stat().st_blocks * 512)
                except OSError:
                    pass
            need += max(0, shard.file_size - have)
    if plan.write_masks:
        import math
        from .plan import mask_chunk_rows
        for name in plan.merge:
            shape = plan.shapes[name] or (1,)
            n = math.prod(shape)
            chunks = -(-shape[0] // mask_chunk_rows(shape))
            need += k * (n // 8 + chunks * 4096)
    need += len(plan.merge) * k * 200
    return need
