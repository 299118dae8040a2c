"""A run directory's guards: one writer at a time (a lock that names its holder), and a resume only
under the config the run was started with."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from pathlib import Path

import yaml

from .config import Config, ConfigError

# Keys that never change what a run computes: compared, but resume=force accepts a change.
SAFE_TO_CHANGE = ("save_every", "logging", "engine.bucket_mb", "engine.gpu_memory_utilization",
                  "engine.kv_cache_gib", "model.micro_batch_size", "model.activation_checkpointing")
# Keys that name the run or say how to resume it: never compared.
NOT_COMPARED = ("output_dir", "run_name", "resume")
HEARTBEAT_S = 30.0
STALE_S = 180.0  # a lock from another host whose holder has not written for this long is abandoned


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}{i}."))
        out[f"{prefix}len"] = len(tree)
        return out
    return {prefix[:-1]: tree}


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for every compared key that differs. A key the saved config
    lacks (it predates the key) counts as its default."""
    a, b = _flat(saved), _flat(current)
    defaults = _flat(dataclasses.asdict(Config()))
    out = []
    for k in sorted(set(a) | set(b)):
        old, new = a.get(k, defaults.get(k, "<absent>")), b.get(k, "<absent>")
        if not _under(k, NOT_COMPARED) and old != new:
            out.append((k, old, new))
    return out


def check_config(cfg: Config, saved_path: Path) -> list[tuple[str, object, object]]:
    """Compare the resolved config with the one a run was started with; raise ConfigError (before any
    compute) when a key that changes results differs, or a safe key differs without resume=force.
    Returns the accepted changes."""
    if not saved_path.is_file():
        return []
    saved = yaml.safe_load(saved_path.read_text()) or {}
    changes = config_changes(saved, dataclasses.asdict(cfg))
    unsafe = [c for c in changes if not _under(c[0], SAFE_TO_CHANGE)]
    if not changes or (not unsafe and cfg.resume == "force"):
        return changes
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in (unsafe or changes))
    run_dir = saved_path.parent
    if unsafe:
        raise ConfigError(f"{run_dir} was started with another config ({listed}): these change results, so it "
                          f"cannot be resumed under them. Start a new run with run_name=<new name>, or rerun with "
                          f"the config in {saved_path}")
    raise ConfigError(f"{run_dir} was started with another config ({listed}); these keys are safe to change "
                      f"mid-run: rerun with resume=force to accept them, or run_name=<new name> for a new run")


# ----------------------------------------------------------------------------- the lock

def _proc_start(pid: int) -> str | None:
    """The kernel's start time of a process (guards against a reused pid); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]


class RunLock:
    """run_dir/lock while a run writes run_dir: {"host", "pid", "start", "started"} of the rank-0 process.

    Created by a hard link of a complete file (atomic on local and network filesystems); a holder
    rewrites it every HEARTBEAT_S seconds so that launchers on other hosts can tell a live lock
    from an abandoned one."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "lock"
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder_alive(self, holder: dict) -> bool:
        if holder.get("host") == self.mine["host"]:
            start = _proc_start(int(holder.get("pid", -1)))
            return start is not None and (start == "?" or holder.get("start") in (None, start))
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        return age < STALE_S

    def acquire(self, log=print) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"lock.{self.mine['host']}.{os.getpid()}")
        tmp.write_text(json.dumps(self.mine))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    break
                except FileExistsError:
                    try:
                        holder = json.loads(self.path.read_text())
                    except (FileNotFoundError, json.JSONDecodeError):
                        holder = {}
                    if holder and self._holder_alive(holder):
                        raise ConfigError(f"{self.path.parent} is being written by another run: pid "
                                          f"{holder.get('pid')} on {holder.get('host')}, started "
                                          f"{holder.get('started')}. Wait for it, stop it, or use run_name=")
                    stale = self.path.with_name(f"lock.stale.{os.getpid()}")
                    try:
                        os.rename(self.path, stale)  # only one of several launchers wins this rename
                    except FileNotFoundError:
                        continue
                    stale.unlink(missing_ok=True)
                    log(f"took over the lock of {self.path.parent}: its holder (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, started {holder.get('started')}) is gone")
            else:
                raise ConfigError(f"could not take the lock {self.path}")
        finally:
            tmp.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._beat, name="opcod-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (FileNotFoundError, json.JSONDecodeError):
            pass
