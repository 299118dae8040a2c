"""Engine-agnostic weight sync: stream full parameters one at a time through a fixed-size bucket
that the engine process maps once, and describe each bucket with plain metadata."""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 256  # byte alignment of every tensor inside a bucket


def hf_name(name: str, strip: str = "") -> str:
    """The Hugging Face parameter name of a trainer parameter: `strip` (the Student's "lm.") removed.

    Nothing else is rewritten: FSDP2's fully_shard and transformers' own activation checkpointing
    keep parameter names as they are (no `_fsdp_wrapped_module.` or `_checkpoint_wrapped_module.`
    segments, which FSDP1 and torch's checkpoint_wrapper would add), and opcod neither compiles
    nor wraps students in DDP."""
    return name[len(strip):] if strip and name.startswith(strip) else name


def iter_full_params(module: nn.Module, strip: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) per parameter; sharded DTensors are gathered one at a time.

    Every rank must iterate (the gathers are collectives); a tied weight appears once.
    """
    from torch.distributed.tensor import DTensor
    for name, p in module.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        yield hf_name(name, strip), full.detach()


def bucket_bytes_for(module: nn.Module, bucket_mb: int, dtype: torch.dtype | None) -> int:
    """The bucket size: bucket_mb, grown to fit the largest single tensor (an embedding, say)."""
    largest = 0
    for p in module.parameters():
        itemsize = (dtype or p.dtype).itemsize
        largest = max(largest, p.numel() * itemsize)  # DTensor numel is the full size
    return max(bucket_mb << 20, _aligned(largest))


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# ----------------------------------------------------------------------------- the shared bucket
# A handle is plain data (str, int, bool, bytes) so that it crosses vLLM's msgpack serializer, a
# pipe or JSON-like RPC without pickling any object; the receiver rebuilds the tensor itself.

def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def shared_bucket(nbytes: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """A uint8 bucket on `device` that another process can map, and its handle.

    CUDA: device memory exported by CUDA IPC, tagged with the GPU's UUID. CPU: a file in
    /dev/shm mapped shared; the sender unlinks it once the receiver has mapped it."""
    if device.type == "cuda":
        from torch.multiprocessing.reductions import reduce_tensor
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        _, args = reduce_tensor(buf)
        # reduce_tensor's args: tensor class, size, stride, offset, storage class, dtype, device,
        # then the CUDA-IPC fields; only the IPC fields and the offset need to travel.
        (_, _, _, offset, _, _, _, handle, storage_size, storage_offset, _,
         rc_handle, rc_offset, event_handle, event_sync) = args
        return buf, {"kind": "cuda", "nbytes": nbytes, "gpu_uuid": gpu_uuid(device), "offset": offset,
                     "handle": handle, "storage_size": storage_size, "storage_offset": storage_offset,
                     "ref_counter_handle": rc_handle, "ref_counter_offset": rc_offset,
                     "event_handle": event_handle, "event_sync_required": event_sync}
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="opcod-bucket-", dir=folder)
    os.close(fd)
    buf = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    return buf, {"kind": "shm", "nbytes": nbytes, "path": path}


def release_handle(handle: dict) -> None:
    """Once the receiver has mapped the bucket, the name is no longer needed (CPU: unlink)."""
    if handle["kind"] == "shm":
        try:
            os.unlink(handle["path"])
        except FileNotFoundError:
            pass


def open_bucket(handle: dict, device: torch.device) -> torch.Tensor:
    """The receiver's view of a bucket made by shared_bucket(); a CUDA bucket must come from the
    GPU this process runs on (checked by UUID, since device indices differ between processes)."""
    if handle["kind"] == "shm":
        return torch.from_file(handle["path"], shared=True, size=handle["nbytes"], dtype=torch.uint8)
    if device.type != "cuda":
        raise RuntimeError(f"a CUDA bucket handle reached an engine on {device}")
    mine = gpu_uuid(device)
    if handle["gpu_uuid"] != mine:
        raise RuntimeError(f"the trainer's bucket lives on GPU {handle['gpu_uuid']}, but this engine runs on GPU "
                           f"{mine} ({device}): each rank's engines must run on that rank's GPU "
                           "(check CUDA_VISIBLE_DEVICES and LOCAL_RANK)")
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    n = handle["nbytes"]
    return rebuild_cuda_tensor(torch.Tensor, torch.Size([n]), (1,), handle["offset"], torch.TypedStorage,
                               torch.uint8, device.index, handle["handle"], handle["storage_size"],
                               handle["storage_offset"], False, handle["ref_counter_handle"],
                               handle["ref_counter_offset"], handle["event_handle"],
                               handle["event_sync_required"])


# ----------------------------------------------------------------------------- packing

def tensor_meta(name: str, t: torch.Tensor, offset: int) -> dict:
    """Where one tensor sits in a bucket: a plain dict (dataclasses arrive as dicts over msgpack)."""
    return {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "offset": offset, "nbytes": t.numel() * t.element_size()}


class BucketWriter:
    """Packs tensors into `buffer` (uint8); when the next one does not fit, hands the packed
    metadata to `flush`, which must return only once the receiver has consumed the bucket."""

    def __init__(self, buffer: torch.Tensor, flush: Callable[[list[dict]], None],
                 dtype: torch.dtype | None = None):
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError(f"a bucket is a 1-D uint8 tensor, got {buffer.dtype} of shape {tuple(buffer.shape)}")
        self.buffer, self._flush, self.dtype = buffer, flush, dtype
        self.metas: list[dict] = []
        self.offset = 0
        self.bytes_sent = 0
        self.buckets = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.to(device=self.buffer.device, dtype=self.dtype or tensor.dtype).contiguous()
        n = t.numel() * t.element_size()
        if n > self.buffer.numel():
            raise ValueError(f"{name}: {n} bytes do not fit a {self.buffer.numel()}-byte bucket")
        if self.offset + n > self.buffer.numel():
            self.flush()
        self.buffer[self.offset:self.offset + n].copy_(t.reshape(-1).view(torch.uint8))
        self.metas.append(tensor_meta(name, t, self.offset))
        self.offset = _aligned(self.offset + n)
        self.bytes_sent += n

    def flush(self) -> None:
        if not self.metas:
            return
        if self.buffer.is_cuda:
            torch.cuda.current_stream(self.buffer.device).synchronize()  # bytes land before the handoff
        self._flush(self.metas)
        self.buckets += 1
        self.metas, self.offset = [], 0


def unpack(buffer: torch.Tensor, metas: Iterable[dict]) -> list[tuple[str, torch.Tensor]]:
    """Views of each tensor inside a received bucket (copy them before the bucket is reused)."""
    return [(m["name"], buffer[m["offset"]:m["offset"] + m["nbytes"]].view(getattr(torch, m["dtype"]))
             .view(m["shape"])) for m in metas]


def synchronize_device(device: torch.device) -> None:
    """Wait until every copy queued on `device` by this process has run (CPU copies already have)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def receive_bucket(buffer: torch.Tensor, metas: Iterable[dict],
                   load: Callable[[list[tuple[str, torch.Tensor]]], object], *, clone: bool = True,
                   synchronize: bool = True) -> None:
    """The receiving half of one bucket, shared by every engine: `load` gets (name, tensor) pairs,
    copies of the bucket's bytes when `clone` (a loader that keeps tensors past this call needs
    them: vLLM's layerwise reload buffers a layer until all of it has arrived) or views otherwise.

    It returns only once those copies have run: the sender writes the next tensors into the same
    bucket as soon as this returns, and on a GPU the clones and the loader's copies are merely
    queued on this process's stream when load() returns (vLLM's own IPC receivers synchronize at
    the same point for the same reason). `synchronize=False` exists only so that
    benchmarks/gpu_check.py can show the race."""
    weights = unpack(buffer, metas)
    if clone:
        weights = [(name, t.clone()) for name, t in weights]
    load(weights)
    del weights
    if synchronize:
        synchronize_device(buffer.device)


@dataclass
class SyncStats:
    bytes: int = 0
    seconds: float = 0.0
    buckets: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


def push_weights(named: Iterable[tuple[str, torch.Tensor]], engine) -> SyncStats:
    """Stream (name, tensor) pairs into `engine` bucket by bucket: any object with .buffer, .dtype,
    .begin_load(), .load_bucket(metas) and .finish_load()."""
    start = time.perf_counter()
    engine.begin_load()
    writer = BucketWriter(engine.buffer, engine.load_bucket, engine.dtype)
    for name, tensor in named:
        writer.add(name, tensor)
    writer.flush()
    engine.finish_load()
    return SyncStats(writer.bytes_sent, time.perf_counter() - start, writer.buckets)
