"""The `vllm` generation engine (GPU): a thin layer over vLLM's LLM with a worker extension that
rebuilds the trainer's CUDA-IPC bucket and loads each bucket with `model.load_weights`.

Everything else (packing, names, scheduling) is engine-agnostic and lives in opcod.weight_sync,
where the CPU engine exercises it in every test run.
"""
from __future__ import annotations

import os

import torch

from .engine_hf import Sampling
from .weight_sync import TensorMeta, unpack


class OpcodWorkerExtension:
    """Mixed into vLLM's GPU worker (worker_extension_cls); called through collective_rpc."""

    def opcod_attach_bucket(self, handle) -> None:
        func, args = handle
        args = list(args)
        args[6] = self.device.index  # the sender's device index means nothing in this process
        self._opcod_bucket = func(*args)

    def opcod_load_bucket(self, metas: list[TensorMeta]) -> None:
        self.model_runner.model.load_weights(weights=unpack(self._opcod_bucket, metas))
        torch.cuda.synchronize()

    def opcod_weight_sum(self) -> float:
        """Sum of every weight (tests compare it with the trainer's; fused q/k/v keep the sum)."""
        return float(sum(p.double().sum() for p in self.model_runner.model.parameters()))

    def opcod_finish_load(self) -> None:
        from vllm.model_executor.model_loader.utils import process_weights_after_loading
        process_weights_after_loading(self.model_runner.model, self.model_config, self.device)
        torch.cuda.synchronize()


class VLLMEngine:
    """A colocated vLLM engine on this rank's GPU, with sleep mode between uses."""

    def __init__(self, model_dir: str, bucket_bytes: int, dtype: torch.dtype, seed: int,
                 gpu_memory_utilization: float, max_model_len: int, trust_remote_code: bool = False):
        # collective_rpc pickles the IPC handle (a function and its arguments) to the engine core.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from torch.multiprocessing.reductions import reduce_tensor
        from vllm import LLM
        self.dtype = dtype
        self.llm = LLM(model=model_dir, dtype=dtype, seed=seed, enable_sleep_mode=True,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       trust_remote_code=trust_remote_code, enable_prefix_caching=True,
                       worker_extension_cls=f"{__name__}.OpcodWorkerExtension")
        self.buffer = torch.empty(bucket_bytes, dtype=torch.uint8, device="cuda")
        self.llm.collective_rpc("opcod_attach_bucket", args=(reduce_tensor(self.buffer),))
        self._weights_asleep = self._kv_asleep = False

    def load_bucket(self, metas: list[TensorMeta]) -> None:
        self.wake(weights_only=True)
        self.llm.collective_rpc("opcod_load_bucket", args=(metas,))

    def finish_load(self) -> None:
        self.llm.collective_rpc("opcod_finish_load")
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[list[int]]:
        from vllm import SamplingParams
        if not prompts:
            return []
        self.wake()
        params = SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, seed=seed)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def sleep(self) -> None:
        if not (self._weights_asleep or self._kv_asleep):
            self.llm.sleep(level=1)  # weights to CPU, KV cache dropped: the trainer gets the GPU
            self._weights_asleep = self._kv_asleep = True

    def wake(self, weights_only: bool = False) -> None:
        if self._weights_asleep:
            self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False
        if self._kv_asleep and not weights_only:
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_asleep = False

    def close(self) -> None:
        del self.llm
        torch.cuda.ipc_collect()
