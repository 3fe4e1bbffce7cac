"""The resume ledger: durable appends, a torn last line ignored and cut away, real corruption refused."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.ledger import Ledger, LedgerError

REPO = Path(__file__).resolve().parents[1]


def test_record_and_done(tmp_path):
    path = tmp_path / "state" / "ledger.jsonl"
    assert Ledger(path).done() == {}
    with Ledger(path) as led:
        led.record("merge:a", {"stats": [{"numel": 3}]})
        led.record("copy:b", {"copied": "b"})
        led.record("merge:a", {"stats": [{"numel": 4}]})      # a re-run job: the later record wins
    assert Ledger(path).done() == {"merge:a": {"stats": [{"numel": 4}]}, "copy:b": {"copied": "b"}}
    lines = path.read_text().splitlines()
    assert [json.loads(x)["job"] for x in lines] == ["merge:a", "copy:b", "merge:a"]


@pytest.mark.parametrize("tail", [b'{"job": "c", "resu', b'{"job": "c", "result": {}}', b"\x00\x00\x00\n",
                                  b'{"job": "c"}\n', b"garbage\n"])
def test_torn_last_line_is_ignored_then_cut(tmp_path, tail):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as led:
        led.record("a", 1)
        led.record("b", {"x": [1, 2]})
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(tail)
    assert Ledger(path).done() == {"a": 1, "b": {"x": [1, 2]}}
    with Ledger(path) as led:
        led.record("c", 3)
    assert path.read_bytes() == good + b'{"job":"c","result":3}\n'
    assert Ledger(path).done() == {"a": 1, "b": {"x": [1, 2]}, "c": 3}


def test_corruption_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"job": "a", "result": 1}\nnot json\n{"job": "b", "result": 2}\n')
    with pytest.raises(LedgerError, match="line 2"):
        Ledger(path).done()


CHILD = """
import sys
from pipeline.ledger import Ledger
led = Ledger(sys.argv[1])
i = 0
while True:
    led.record(f"job{i}", {"i": i, "pad": "x" * 200_000})
    i += 1
"""


def test_sigkill_while_recording(tmp_path):
    path = tmp_path / "ledger.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=REPO)
    try:
        deadline = time.time() + 20
        while (not path.exists() or path.stat().st_size < 2_000_000) and time.time() < deadline:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = Ledger(path).done()
    assert len(done) >= 5
    assert all(done[f"job{i}"]["i"] == i for i in range(len(done)))   # a gap-free prefix
    with Ledger(path) as led:
        led.record("after", {})
    again = Ledger(path).done()
    assert again == {**done, "after": {}}
