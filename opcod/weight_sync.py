"""Engine-agnostic weight sync: stream full parameters one at a time through a fixed-size bucket."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 256  # byte alignment of every tensor inside a bucket
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def hf_name(name: str, strip: str = "") -> str:
    """The Hugging Face parameter name of a trainer parameter (wrapper prefixes removed)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name[len(strip):] if strip and name.startswith(strip) else name


def iter_full_params(module: nn.Module, strip: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) per parameter; sharded DTensors are gathered one at a time.

    Every rank must iterate (the gathers are collectives); a tied weight appears once.
    """
    from torch.distributed.tensor import DTensor
    for name, p in module.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        yield hf_name(name, strip), full.detach()


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str          # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def bucket_bytes_for(module: nn.Module, bucket_mb: int, dtype: torch.dtype | None) -> int:
    """The bucket size: bucket_mb, grown to fit the largest single tensor (an embedding, say)."""
    largest = 0
    for p in module.parameters():
        itemsize = (dtype or p.dtype).itemsize
        largest = max(largest, p.numel() * itemsize)  # DTensor numel is the full size
    return max(bucket_mb << 20, _aligned(largest))


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class BucketWriter:
    """Packs tensors into `buffer` (uint8); when the next one does not fit, hands the packed
    metadata to `flush`, which must return only once the receiver has consumed the bucket."""

    def __init__(self, buffer: torch.Tensor, flush: Callable[[list[TensorMeta]], None],
                 dtype: torch.dtype | None = None):
        assert buffer.dtype == torch.uint8 and buffer.dim() == 1
        self.buffer, self._flush, self.dtype = buffer, flush, dtype
        self.metas: list[TensorMeta] = []
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
        self.metas.append(TensorMeta(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), self.offset, n))
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


def unpack(buffer: torch.Tensor, metas: Iterable[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Views of each tensor inside a received bucket (copy them before the bucket is reused)."""
    return [(m.name, buffer[m.offset:m.offset + m.nbytes].view(getattr(torch, m.dtype)).view(m.shape))
            for m in metas]


@dataclass
class SyncStats:
    bytes: int = 0
    seconds: float = 0.0
    buckets: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


def push_weights(named: Iterable[tuple[str, torch.Tensor]], engine) -> SyncStats:
    """Stream (name, tensor) pairs into `engine` (any object with .buffer, .dtype, .load_bucket(metas)
    and .finish_load()) bucket by bucket."""
    start = time.perf_counter()
    writer = BucketWriter(engine.buffer, engine.load_bucket, engine.dtype)
    for name, tensor in named:
        writer.add(name, tensor)
    writer.flush()
    engine.finish_load()
    return SyncStats(writer.bytes_sent, time.perf_counter() - start, writer.buckets)
