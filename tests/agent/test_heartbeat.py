"""The storage heartbeat: atomic writes, the reader, failures reported."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kvmha.agent.heartbeat import HeartbeatWriter, heartbeat_file, read_heartbeat, write_heartbeat
from tests.agent.conftest import new_uuid


def test_write_then_read_gives_the_age(tmp_path: Path) -> None:
    host = new_uuid()
    write_heartbeat(str(tmp_path), host, 1000.0)
    assert Path(heartbeat_file(str(tmp_path), host)).read_text() == "1000.000\n"
    reading = read_heartbeat((str(tmp_path),), host, 1012.5)
    assert reading.found and reading.age_s == 12.5
    assert not [p for p in os.listdir(tmp_path / "kvmha" / "heartbeat") if ".tmp." in p]  # no leftovers


def test_reader_takes_the_freshest_path_and_survives_garbage(tmp_path: Path) -> None:
    host = new_uuid()
    a, b, c = (str(tmp_path / n) for n in "abc")
    for path in (a, b, c):
        os.mkdir(path)
    write_heartbeat(a, host, 100.0)
    write_heartbeat(b, host, 190.0)
    reading = read_heartbeat((a, b, c), host, 200.0)
    assert reading.found and reading.age_s == 10.0 and reading.path.startswith(b)
    Path(heartbeat_file(b, host)).write_text("garbage")  # torn/foreign content: falls back to the mtime
    reading = read_heartbeat((b,), host, time.time())
    assert reading.found and reading.age_s < 5
    assert not read_heartbeat((c,), host, 200.0).found


def test_writer_reports_success_and_failure_per_path(tmp_path: Path) -> None:
    host = new_uuid()
    good = str(tmp_path / "good")
    bad = str(tmp_path / "bad")
    unmounted = str(tmp_path / "not-mounted")
    os.mkdir(good)
    os.mkdir(bad)
    Path(bad, "kvmha").write_text("a file where the heartbeat directory must be")
    writer = HeartbeatWriter((good, bad, unmounted), host, interval_s=0.05)
    writer.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not writer.status()[0].ok:
            time.sleep(0.02)
        time.sleep(0.2)
        ok, failing, missing = writer.status()
    finally:
        writer.stop()
    assert ok.ok and 0 <= ok.last_ok_age_s < 1 and ok.error == ""
    assert not failing.ok and failing.last_ok_age_s < 0 and "Not a directory" in failing.error
    assert not missing.ok and "not mounted" in missing.error
    assert not os.path.exists(unmounted)  # the agent never creates the storage path itself
    assert read_heartbeat((good,), host, time.time()).age_s < 1
    assert writer.last_ok_at() is not None
