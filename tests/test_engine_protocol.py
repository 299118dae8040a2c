"""The engines' side of the weight sync and their sleep states, without vLLM: the receiver returns
only after its copies, a half-awake engine sleeps, vLLM's refusals are not dropped, and an engine
is never started in the trainer's process."""
import sys
import types

import pytest
import torch

from opcod import weight_sync as ws
from opcod.engine_vllm import OpcodWorkerExtension, VLLMEngine, check_attached, check_multiprocessing

# ----------------------------------------------------------------------------- receiving a bucket


def _bucket(tensors):
    buf = torch.zeros(1 << 12, dtype=torch.uint8)
    sent = []
    writer = ws.BucketWriter(buf, sent.append)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.flush()
    return buf, sent[0]


@pytest.fixture
def events(monkeypatch):
    """Calls of synchronize_device, in order with the loader's (raising=False: the spy must also
    install on code that has no such function, so that a missing synchronisation fails below)."""
    log = []
    monkeypatch.setattr(ws, "synchronize_device", lambda device: log.append(("sync", device.type)), raising=False)
    return log


def test_a_bucket_is_released_only_after_the_received_copies(events):
    tensors = {"a.weight": torch.randn(3, 5), "b.bias": torch.arange(7, dtype=torch.float64)}
    buf, metas = _bucket(tensors)
    got = {}

    def load(weights):
        events.append(("load", [n for n, _ in weights]))
        got.update(weights)
    ws.receive_bucket(buf, metas, load, clone=True)
    assert events == [("load", ["a.weight", "b.bias"]), ("sync", "cpu")]
    buf.fill_(0)  # the sender reuses the bucket: clones keep what was received
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name


def test_the_vllm_worker_extension_synchronizes_before_its_rpc_returns(events, monkeypatch):
    """On a GPU the clones and vLLM's loader copies are only queued when load_weights returns; the
    trainer writes the next tensors into the bucket as soon as the RPC returns."""
    import contextlib
    # The extension needs only vLLM's config context here; a stand-in keeps this test off vLLM.
    fake = types.ModuleType("vllm.config")
    fake.set_current_vllm_config = lambda cfg: contextlib.nullcontext()
    if "vllm" not in sys.modules:
        monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.config", fake)
    tensors = {"model.norm.weight": torch.randn(16), "lm_head.weight": torch.randn(4, 16)}
    buf, metas = _bucket(tensors)
    loaded = {}

    def load_weights(weights):
        weights = list(weights)
        events.append(("load", [n for n, _ in weights]))
        loaded.update(weights)
    worker = OpcodWorkerExtension()
    worker._opcod_bucket = buf
    worker.vllm_config = None
    worker.model_runner = types.SimpleNamespace(get_model=lambda: types.SimpleNamespace(load_weights=load_weights))
    worker.opcod_load_bucket(metas)
    assert events == [("load", ["model.norm.weight", "lm_head.weight"]), ("sync", "cpu")]
    buf.fill_(0)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_the_hf_engine_loads_through_the_same_receiver(events):
    from opcod.engine_hf import load_into
    params = {"w": torch.zeros(3, 5)}
    buf, metas = _bucket({"w": torch.ones(3, 5)})
    ws.receive_bucket(buf, metas, lambda weights: load_into(params, weights), clone=False)
    assert torch.equal(params["w"], torch.ones(3, 5)) and events == [("sync", "cpu")]
    with pytest.raises(KeyError, match="'x'"):
        ws.receive_bucket(*_bucket({"x": torch.ones(2)}), lambda weights: load_into(params, weights))


def test_a_cuda_bucket_from_another_gpu_is_refused_by_uuid(monkeypatch):
    monkeypatch.setattr(ws, "gpu_uuid", lambda device: "GPU-mine")
    handle = {"kind": "cuda", "nbytes": 8, "gpu_uuid": "GPU-theirs"}
    with pytest.raises(RuntimeError, match="GPU-theirs.*GPU-mine"):
        ws.open_bucket(handle, torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="reached an engine on cpu"):
        ws.open_bucket(handle, torch.device("cpu"))


def test_names_are_only_stripped_of_the_students_prefix():
    """FSDP2 and transformers' checkpointing keep parameter names; a name that merely contains a
    former wrapper's text ("module.") is left alone."""
    assert ws.hf_name("lm.model.layers.0.mlp.up_proj.weight", "lm.") == "model.layers.0.mlp.up_proj.weight"
    assert ws.hf_name("lm.model.vision_submodule.proj.weight", "lm.") == "model.vision_submodule.proj.weight"
    assert ws.hf_name("model.norm.weight") == "model.norm.weight"


def test_fsdp2_and_checkpointing_keep_the_hugging_face_names():
    """The names the sync sends are the model's own state-dict keys (an independent reference: the
    unwrapped transformers model), with FSDP2 sharding and activation checkpointing on."""
    import socket

    import torch.distributed as dist
    from transformers import Qwen3ForCausalLM

    from opcod.models import Student, shard
    from opcod.tiny import tiny_config
    cfg = tiny_config(50, hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32, tie=False)
    want = set(Qwen3ForCausalLM(cfg).state_dict())
    owned = not dist.is_initialized()
    if owned:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        student = shard(Student(Qwen3ForCausalLM(cfg)), torch.device("cpu"), activation_checkpointing=True)
        assert {name for name, _ in ws.iter_full_params(student, strip="lm.")} == want
    finally:
        if owned:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- vLLM's sleep states


class FakeLLM:
    """vLLM 0.32's sleep bookkeeping as its executor and CuMem allocator keep it
    (vllm/v1/executor/abstract.py, vllm/device_allocator/cumem.py): sleep() is skipped only while
    the weights sleep; the allocator puts to sleep whatever is still mapped; wake_up(tags) returns
    whether everything is awake again (the scheduler resumes only then)."""

    def __init__(self):
        self.asleep: set[str] = set()
        self.calls: list = []
        self.prefix_reset_ok = True

    def sleep(self, level=1):
        self.calls.append(("sleep", level))
        if "weights" in self.asleep:
            return
        self.asleep |= {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags or ())))
        self.asleep -= set(tags) if tags else set(self.asleep)
        return not self.asleep

    def reset_prefix_cache(self):
        return self.prefix_reset_ok

    def collective_rpc(self, method, args=()):
        self.calls.append(("rpc", method))
        return []


def _engine(llm=None) -> VLLMEngine:
    """A VLLMEngine around a fake LLM, as __init__ leaves it (awake, sleep mode on)."""
    eng = object.__new__(VLLMEngine)
    eng.llm, eng.sleep_mode, eng.dtype = llm or FakeLLM(), True, torch.float32
    eng.device = torch.device("cpu")
    eng._weights_asleep = eng._kv_asleep = eng._weights_dropped = False
    return eng


def test_an_engine_woken_for_a_push_that_never_generated_sleeps_again():
    """A tutor engine on a rank where the gate allowed none of its rollouts: its weights were woken
    for the push, its KV cache never; before the update it must release the weights."""
    eng = _engine()
    assert eng.sleep(keep_weights=False) is False       # about to be overwritten: dropped
    eng.begin_load()                                     # wakes the weights alone
    assert eng.llm.asleep == {"kv_cache"}
    eng.finish_load()
    assert eng.sleep(keep_weights=True) is True          # the update: the tutor keeps its snapshot
    assert eng.llm.asleep == {"weights", "kv_cache"}
    assert eng.llm.calls[-1] == ("sleep", 1)


def test_a_sleeping_engine_wakes_whole_and_refuses_a_partial_wake():
    eng = _engine()
    eng.sleep(keep_weights=True)
    eng.wake()
    assert eng.llm.asleep == set()
    eng.sleep(keep_weights=True)
    eng.llm.wake_up = lambda tags=None: False            # vLLM: still partly asleep, scheduler paused
    with pytest.raises(RuntimeError, match="not fully awake"):
        eng.wake()


def test_a_refused_prefix_cache_reset_is_an_error():
    eng = _engine()
    eng.llm.prefix_reset_ok = False
    with pytest.raises(RuntimeError, match="reset_prefix_cache"):
        eng.finish_load()


def test_every_worker_must_map_the_whole_bucket_on_the_trainers_gpu():
    check_attached([{"device": "cuda:0", "nbytes": 64, "gpu_uuid": "GPU-a"}], 64, "GPU-a")
    with pytest.raises(RuntimeError, match="no worker"):
        check_attached([], 64, None)
    with pytest.raises(RuntimeError, match="mapped 32 bytes"):
        check_attached([{"device": "cpu", "nbytes": 32, "gpu_uuid": None}], 64, None)
    with pytest.raises(RuntimeError, match="GPU-b"):
        check_attached([{"device": "cuda:0", "nbytes": 64, "gpu_uuid": "GPU-b"}], 64, "GPU-a")


@pytest.mark.parametrize("value, ok", [("1", True), ("0", False), ("00", False), ("yes", False)])
def test_engines_in_the_trainers_process_are_refused_by_name(value, ok, monkeypatch):
    if ok:
        check_multiprocessing({"VLLM_ENABLE_V1_MULTIPROCESSING": value})
        return
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        check_multiprocessing({"VLLM_ENABLE_V1_MULTIPROCESSING": value})
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", value)
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):  # before vLLM is imported
        VLLMEngine("/no/model", 1 << 20, torch.float32, seed=0)
