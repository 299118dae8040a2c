"""The run directory's guards, in one process: config changes found and classified, the lock held,
refused to a second holder, and taken over from a holder that is gone."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from opcod.config import ConfigError, load_config, save_config
from opcod.rundir import STALE_S, RunLock, check_config, config_changes


def _cfg(*overrides):
    return load_config(overrides=["demo=true", *overrides])


def test_config_changes_name_every_differing_key():
    a = dataclasses.asdict(_cfg())
    b = dataclasses.asdict(_cfg("optim.lr=3e-4", "loss.beta=0.2", "run_name=other", "resume=force"))
    assert config_changes(a, b) == [("loss.beta", 0.5, 0.2), ("optim.lr", 1e-5, 3e-4)]
    students = {**a, "students": [{"name": "x", "path": "/p", "domain": ""}]}
    changed = {**a, "students": [{"name": "x", "path": "/q", "domain": ""}]}
    assert config_changes(students, changed) == [("students.0.path", "/p", "/q")]
    saved = dict(a)
    del saved["engine"]["kv_cache_gib"]  # a key added after the run started counts as its default
    assert config_changes(saved, a) == []


def test_resume_refuses_a_changed_config_and_force_takes_only_safe_keys(tmp_path):
    saved = tmp_path / "config.yaml"
    save_config(_cfg(), saved)
    assert check_config(_cfg(), saved) == []
    with pytest.raises(ConfigError, match=r"optim.lr: 1e-05 -> 0.0003.*run_name="):
        check_config(_cfg("optim.lr=3e-4"), saved)
    with pytest.raises(ConfigError, match=r"optim.lr"):
        check_config(_cfg("optim.lr=3e-4", "resume=force"), saved)  # changes results: never forced
    with pytest.raises(ConfigError, match=r"save_every: 0 -> 2.*resume=force"):
        check_config(_cfg("save_every=2"), saved)
    assert check_config(_cfg("save_every=2", "resume=force"), saved) == [("save_every", 0, 2)]
    assert check_config(_cfg("optim.lr=1"), tmp_path / "absent.yaml") == []  # a new run


def test_lock_refuses_a_second_holder_and_is_released(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    holder = json.loads((tmp_path / "lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    # Another live process on this host holds it: refused, naming the holder.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "lock").write_text(json.dumps({**holder, "pid": other.pid, "start": None}))
        with pytest.raises(ConfigError, match=f"pid {other.pid} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()
    (tmp_path / "lock").write_text(json.dumps(holder))
    first.release()
    assert not (tmp_path / "lock").exists()


def test_lock_of_a_gone_holder_is_taken_over_with_one_line(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": "1",
                                               "started": "earlier"}))
    lines = []
    lock = RunLock(tmp_path)
    lock.acquire(log=lines.append)
    assert len(lines) == 1 and f"pid {dead.pid}" in lines[0] and "is gone" in lines[0]
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    lock.release()
    # Another host: alive while it keeps writing the lock, abandoned once it stops.
    (tmp_path / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "earlier"}))
    with pytest.raises(ConfigError, match="on elsewhere"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_S - 5
    os.utime(tmp_path / "lock", (old, old))
    lines.clear()
    lock = RunLock(tmp_path)
    lock.acquire(log=lines.append)
    assert "elsewhere" in lines[0]
    lock.release()
