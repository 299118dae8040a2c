"""Metric names (verl's, SDPO's, OPCoD's under opcod/), old runs upgraded, and what each tracker wrote, read back."""
import glob
import json
import struct
from pathlib import Path

import pytest

from opcod.metrics import score_record, scores_of, upgrade
from opcod.trackers import Trackers, scalars


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file with W&B's own protobuf
    classes (the file is a LevelDB-style log: 7-byte header, 32 KiB blocks of framed records)."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw = Path(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))[-1]).read_bytes()
    assert raw[:4] == b":W&B"
    rows, pos, buf = [], 7, b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        buf += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):   # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_scores_round_trip_and_old_records_upgrade():
    rec = score_record("test", 3, 1, {"a": {"chemistry": 0.5, "physics": 0.25}}, 16)
    assert rec["val-core/a/chemistry/acc/mean@16"] == 0.5 and scores_of(rec) == {"a": {"chemistry": 0.5,
                                                                                       "physics": 0.25}}
    assert "opcod/validation/a/physics/acc/mean@4" in score_record("validation", 0, 1, {"a": {"physics": 1.0}}, 4)
    old = {"kind": "step", "round": 1, "phase": 0, "tutee": "a", "tutor": "b", "step": 5, "step_in_phase": 1,
           "loss": 0.1, "skipped": False, "reward_mean": 0.5, "teacher_fraction": 0.25,
           "feedback": {"kept": 3, "no_match": 1}, "gate_open": True, "grad_norm": 2.0, "lr": 1e-5,
           "times": {"generate": 1.0, "feedback": 0.5, "fwd_bwd": 2.0, "sync": 0.1, "step": 3.6}}
    new = upgrade(old)
    assert new["actor/pg_loss"] == 0.1 and new["critic/rewards/mean"] == 0.5 and new["actor/grad_norm"] == 2.0
    assert new["timing_s/gen"] == 1.0 and new["timing_s/update_actor"] == 2.0 and new["timing_s/step"] == 3.6
    assert new["opcod/feedback/kept"] == 3 and new["opcod/feedback/empty"] == 0 and new["opcod/round"] == 1
    assert new["self_distillation/reprompt_sample_fraction"] == 0.25
    assert scores_of(upgrade({"kind": "validation", "round": 2, "scores": {"a": {"physics": 0.75}}})) == \
        {"a": {"physics": 0.75}}
    assert upgrade(new) == new   # a record in the current names passes through


def test_each_tracker_holds_what_was_logged(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    records = [{"kind": "step", "step": s, "actor/pg_loss": loss, "opcod/gate_open": s == 1, "opcod/tutee": "a",
                "opcod/feedback_leak_rate": None} for s, loss in ((1, 0.5), (2, 0.25))]
    assert scalars(records[0]) == {"step": 1.0, "actor/pg_loss": 0.5, "opcod/gate_open": 1.0}
    t = Trackers(["jsonl", "tensorboard", "wandb", "trackio"], tmp_path, "r", "opcod-test", {"lr": 1e-5})
    for r in records:
        t.log(r, r["step"])
    t.close()
    assert tensorboard_scalars(tmp_path)["actor/pg_loss"] == [(1, 0.5), (2, 0.25)]
    rows = wandb_history(tmp_path)
    assert [(r["_step"], r["actor/pg_loss"], r["opcod/gate_open"]) for r in rows] == [(1, 0.5, 1), (2, 0.25, 0)]
    from trackio.sqlite_storage import SQLiteStorage
    logs = SQLiteStorage.get_logs("opcod-test", "r")
    assert [(x["step"], x["actor/pg_loss"]) for x in logs] == [(1, 0.5), (2, 0.25)]


def test_a_tracker_that_is_not_known_is_refused_by_key():
    from opcod.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="logging.report_to.1"):
        load_config(overrides=["demo=true", "logging.report_to=[jsonl,mlflowx]"])
