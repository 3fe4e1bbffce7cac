"""The resume ledger: one fsync'd JSON line per finished job.

A job is recorded only after its outputs are durable, so after a crash every line
names work that need not be redone; a SIGKILL mid-append can only tear the last
line, which is ignored and cut away before the next append.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


class LedgerError(ValueError):
    """The ledger is corrupt before its last line (not something a crash produces)."""


class Ledger:
    """Append-only JSONL `{"job": id, "result": {...}}`; single writer (the driver, holding the run
    lock). `"result": null` invalidates the job's earlier records."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _scan(self) -> tuple[dict[str, Any], int]:
        """(results by job, byte length of the valid prefix)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}, 0
        done: dict[str, Any] = {}
        pos = 0
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if last and not line:
                break
            try:
                try:
                    rec = json.loads(line)
                except RecursionError:
                    raise ValueError("nested too deeply") from None
                if not (isinstance(rec, dict) and isinstance(rec.get("job"), str) and "result" in rec):
                    raise ValueError("not a ledger record")
                if last:
                    raise ValueError("no trailing newline")
            except ValueError as e:
                if last or (i == len(lines) - 2 and not lines[-1]):
                    break  # torn by a crash: ignored, truncated before the next append
                raise LedgerError(f"{self.path}: line {i + 1} is corrupt ({e})") from None
            if rec["result"] is None:   # invalidated: its outputs were found lost or damaged
                done.pop(rec["job"], None)
            else:
                done[rec["job"]] = rec["result"]
            pos += len(line) + 1
        return done, pos

    def done(self) -> dict[str, Any]:
        """Results of every completely recorded job (a later record of a job wins)."""
        return self._scan()[0]

    def invalidate(self, job_ids) -> None:
        """Forget finished jobs whose outputs were lost or damaged (one `"result": null` line each),
        so that a crash before they are redone cannot resurrect them."""
        for job_id in sorted(job_ids):
            self.record(job_id, None)

    def record(self, job_id: str, result: Any) -> None:
        """Append one line and fsync it before returning."""
        line = (json.dumps({"job": job_id, "result": result}, separators=(",", ":"))
                + "\n").encode()
        with self._lock:
            if self._fd is None:
                self._open()
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        _, valid = self._scan()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(fd).st_size != valid:
            os.ftruncate(fd, valid)
            os.fsync(fd)
        if created:
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._fd = fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
