"""The `hf` generation engine: a transformers model in its own process, fed through the bucket protocol.

The bucket is a shared-memory CPU tensor the engine process maps once at start, from the same
plain handle the vLLM engine receives; each sync packs parameters into it (opcod.weight_sync) and
sends only the metadata over a pipe.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from .weight_sync import open_bucket, receive_bucket, release_handle, shared_bucket


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int


def _generate(model, prompts: list[list[int]], sampling: Sampling, seed: int, pad_id: int,
              eos_ids: list[int], batch_size: int = 64) -> list[list[int]]:
    out: list[list[int]] = []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding: every prompt ends at the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        greedy = sampling.temperature <= 0
        kwargs = {} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        with torch.no_grad():
            res = model.generate(input_ids=ids, attention_mask=mask, do_sample=not greedy,
                                 max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=eos_ids, **kwargs)
        for row in res[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            out.append(row[:cut])
    return out


def load_into(params: dict[str, torch.Tensor], weights: list[tuple[str, torch.Tensor]]) -> None:
    """Copy received (name, tensor) pairs into a transformers model's parameters, by name."""
    for name, t in weights:
        if name not in params:
            raise KeyError(f"engine model has no parameter {name!r}")
        params[name].copy_(t)


def _serve(model_dir: str, dtype: str, handle: dict, conn, pad_id: int, eos_ids: list[int],
           trust_remote_code: bool) -> None:
    torch.set_num_threads(1)
    buffer = open_bucket(handle, torch.device("cpu"))
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                 use_safetensors=True, trust_remote_code=trust_remote_code)
    model.eval()
    params = dict(model.named_parameters())
    conn.send(("ready", None))
    while True:
        cmd, payload = conn.recv()
        try:
            if cmd == "load":
                with torch.no_grad():
                    # Copied straight from the bucket into the parameters: no clone needed.
                    receive_bucket(buffer, payload, lambda weights: load_into(params, weights), clone=False)
                conn.send(("ok", None))
            elif cmd == "generate":
                prompts, sampling, seed = payload
                conn.send(("ok", _generate(model, prompts, sampling, seed, pad_id, eos_ids)))
            elif cmd == "state":
                conn.send(("ok", {k: v.detach().clone() for k, v in model.state_dict().items()}))
            elif cmd == "close":
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except Exception as exc:  # noqa: BLE001 - report to the trainer, keep serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class HFEngine:
    """Client of one `hf` engine process. Same surface as the vLLM engine (opcod.engine_vllm)."""

    def __init__(self, model_dir: str, bucket_bytes: int, dtype: torch.dtype, pad_id: int,
                 eos_ids: list[int], trust_remote_code: bool = False):
        self.dtype = dtype
        self.buffer, handle = shared_bucket(bucket_bytes, torch.device("cpu"))
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # The child inherits no OMP settings from torchrun's ranks; one thread keeps ranks fast.
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            self._proc = ctx.Process(target=_serve, daemon=True, args=(
                model_dir, str(dtype).removeprefix("torch."), handle, child, pad_id, eos_ids,
                trust_remote_code))
            self._proc.start()
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads
        try:
            self._call_raw()  # wait for "ready": the bucket is mapped by then
        finally:
            release_handle(handle)

    def _call_raw(self):
        if not self._conn.poll(600):
            raise RuntimeError("hf engine did not answer within 600 s")
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"hf engine: {value}")
        return value

    def _call(self, cmd, payload=None):
        self._conn.send((cmd, payload))
        return self._call_raw()

    # -- the weight-sync surface (opcod.weight_sync.push_weights)
    def begin_load(self) -> None:
        pass  # parameters are overwritten in place, tensor by tensor

    def load_bucket(self, metas: list[dict]) -> None:
        self._call("load", metas)

    def finish_load(self) -> None:
        pass  # a transformers model has no cache to reset between generate calls

    # -- generation
    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[list[int]]:
        return self._call("generate", (prompts, sampling, seed)) if prompts else []

    def sleep(self, keep_weights: bool = True) -> bool:
        return True  # CPU memory: nothing to release, the weights stay

    def wake(self) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The engine's weights (tests compare them with the trainer's)."""
        return self._call("state")

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._call("close")
            except (RuntimeError, OSError, EOFError):
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
