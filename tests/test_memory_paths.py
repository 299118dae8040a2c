"""Where a student's state lives: optimizer state moved off the device really moves, AdamW's state
exists before the first checkpoint (so the checkpoint neither allocates it on the device nor takes a
fake step), and a sharded student is in training mode. One process, one gloo rank."""
import socket

import pytest
import torch
import torch.distributed as dist

from opcod.models import (Student, init_optimizer_state, make_optimizer, move_optimizer_state, shard,
                          storage_device)
from opcod.tiny import tiny_config


@pytest.fixture(scope="module")
def group():
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _student(seed=0):
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(seed)
    return shard(Student(Qwen3ForCausalLM(tiny_config(50, hidden=16, layers=1, heads=2, kv_heads=1,
                                                      intermediate=32))), torch.device("cpu"))


def _loss(student):
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    h = student(ids, torch.ones_like(ids), torch.arange(12))
    return h.square().sum()


def test_sharded_student_is_in_training_mode(group):
    # transformers checkpoints layers only when module.training; from_pretrained returns eval mode.
    assert _student().training


def test_optimizer_state_moves_with_its_storage(group):
    student = _student()
    opt, _ = make_optimizer(student, 1e-3, 0.01, (0.9, 0.999), 0)
    _loss(student).backward()
    opt.step()
    before = {k: v.full_tensor().clone() for k, v in opt.state[next(iter(opt.state))].items() if v.dim() > 0}
    # "meta" stands in for the other device of a GPU box: where the storage is, not what it holds.
    move_optimizer_state(opt, torch.device("meta"))
    for state in opt.state.values():
        for key, value in state.items():
            if value.dim() > 0:
                assert storage_device(value).type == "meta", key
    assert before  # the moved state had tensors to move


def test_state_made_before_the_first_checkpoint_leaves_the_first_update_alone(group, tmp_path):
    """torch.distributed.checkpoint fills an empty AdamW state by a zero-gradient step (step = 1),
    which would shrink the student's first real update; state made up front is AdamW's own."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def first_update(prepare):
        student = _student()
        opt, _ = make_optimizer(student, 1e-2, 0.01, (0.9, 0.999), 0)
        prepare(student, opt)
        start = {k: v.full_tensor().clone() for k, v in student.named_parameters()}
        _loss(student).backward()
        opt.step()
        return {k: v.full_tensor() - start[k] for k, v in student.named_parameters()}

    plain = first_update(lambda s, o: None)
    checked = first_update(lambda s, o: (init_optimizer_state(o, torch.device("cpu")),
                                         get_optimizer_state_dict(s, o)))
    for k in plain:
        assert torch.equal(plain[k], checked[k]), k


def test_forwards_keep_no_kv_cache():
    """transformers keeps every layer's keys and values in a cache unless told otherwise, and turns
    it off itself only for checkpointed layers with gradients on: the teacher's no-grad forward
    (and an unsharded or un-checkpointed student's) would hold the micro-batch's whole KV."""
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(0)
    student = Student(Qwen3ForCausalLM(tiny_config(50, hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32)))
    outputs = []
    student.lm.get_decoder().register_forward_hook(lambda module, args, out: outputs.append(out))
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        student(ids, torch.ones_like(ids), torch.arange(12))
    student(ids, torch.ones_like(ids), torch.arange(12)).sum().backward()
    for out in outputs:  # the field is `cache` in transformers 5.25, `past_key_values` before
        assert getattr(out, "cache", None) is None and getattr(out, "past_key_values", None) is None
    assert len(outputs) == 2
