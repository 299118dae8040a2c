"""When weights are pushed: never the weights an engine started from, always into a sleeping engine,
and a phase starts with the engines asleep and one AdamW state at a time on the device."""
import types

import torch

from opcod.engines import Engines


class Recorder:
    """An engine that records what the trainer asks of it (the weight-sync surface and sleep)."""

    def __init__(self, log, name):
        self.log, self.name = log, name
        self.buffer, self.dtype = torch.zeros(1 << 10, dtype=torch.uint8), None

    def sleep(self, keep_weights=True):
        self.log.append((self.name, "sleep", keep_weights))
        return keep_weights

    def begin_load(self):
        self.log.append((self.name, "begin_load"))

    def load_bucket(self, metas):
        self.log.append((self.name, "load", len(metas)))

    def finish_load(self):
        self.log.append((self.name, "finish_load"))


def test_the_weights_an_engine_started_from_are_not_pushed_again():
    log = []
    engines = Engines(Recorder(log, "rollout"), Recorder(log, "tutor"), loaded=("A", 0))
    assert engines.ensure("rollout", ("A", 0), lambda: iter([("w", torch.ones(2))])) is None
    assert engines.ensure("tutor", ("A", 0), lambda: iter([("w", torch.ones(2))])) is None
    assert log == []


def test_a_push_puts_its_engine_to_sleep_first_and_drops_what_it_replaces():
    log = []
    engines = Engines(Recorder(log, "rollout"), Recorder(log, "tutor"), loaded=("A", 0))
    stats = engines.ensure("rollout", ("B", 0), lambda: iter([("w", torch.ones(2))]))
    assert stats is not None and stats.bytes == 8
    assert log == [("rollout", "sleep", False), ("rollout", "begin_load"), ("rollout", "load", 1),
                   ("rollout", "finish_load")]


def test_the_phase_start_sleeps_engines_and_never_holds_two_optimizer_states(monkeypatch):
    """Round 2, phase 0: the previous phase's tutee (B) has its AdamW state on the device. The
    engines sleep first; B's state leaves before A's arrives."""
    from opcod import train
    log, on_device = [], {"B"}
    most = [len(on_device)]

    def move(opt, device):
        (on_device.add if device == "gpu" else on_device.discard)(opt)
        most[0] = max(most[0], len(on_device))
        log.append(("move", opt, device))

    class FakeEngines:
        def sleep_for_update(self, keep=None):
            log.append(("sleep", keep))

    monkeypatch.setattr(train, "move_optimizer_state", move)
    run = types.SimpleNamespace(engines=FakeEngines(), names=["A", "B"], optims={"A": ("A", None), "B": ("B", None)},
                                progress=types.SimpleNamespace(versions={"A": 7, "B": 9}), host="cpu", device="gpu")
    train.CoDistillation.begin_phase(run, "A")
    assert log[0] == ("sleep", ("A", 7))
    assert on_device == {"A"} and most[0] == 1, log
