"""This rank's generation engines (one for rollouts, one for the tutor, or one shared) and which
weights each one holds, so that weights are pushed only when the engine's copy is stale."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

from .config import EngineConfig
from .engine_hf import Sampling
from .weight_sync import SyncStats, push_weights

ROLES = ("rollout", "tutor")


def engine_threads(engines_per_rank: int) -> int:
    """CPU threads per engine process: the cores shared by every engine of every local rank."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, (os.cpu_count() or 1) // (ranks * engines_per_rank))


def make_engine(cfg: EngineConfig, model_dir: str, *, bucket_bytes: int, dtype: torch.dtype, seed: int,
                tokenizer, device: torch.device, trust_remote_code: bool = False, engines_per_rank: int = 1):
    """An engine of kind cfg.kind that starts from the weights in `model_dir`."""
    if cfg.kind == "vllm":
        from .engine_vllm import VLLMEngine
        return VLLMEngine(model_dir, bucket_bytes, dtype, seed, gpu_memory_utilization=cfg.gpu_memory_utilization,
                          max_model_len=cfg.max_model_len, kv_cache_gib=cfg.kv_cache_gib,
                          trust_remote_code=trust_remote_code, device=device,
                          threads=engine_threads(engines_per_rank))
    from .engine_hf import HFEngine
    return HFEngine(model_dir, bucket_bytes, dtype, tokenizer.pad_token_id, [tokenizer.eos_token_id],
                    trust_remote_code)


class Engines:
    """The engines by role, and the key of the weights each holds (any hashable: a student and
    its version, or a round snapshot)."""

    def __init__(self, rollout, tutor=None, loaded=None):
        """`loaded`: the key of the weights every engine started from (the files it loaded), so
        that the first use of those weights pushes nothing."""
        self.by_role = {"rollout": rollout, "tutor": tutor if tutor is not None else rollout}
        self.held: dict[int, object] = {} if loaded is None else {id(e): loaded for e in self.distinct()}

    @property
    def shared(self) -> bool:
        return self.by_role["rollout"] is self.by_role["tutor"]

    def distinct(self) -> list:
        return list({id(e): e for e in self.by_role.values()}.values())

    def ensure(self, role: str, key, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> SyncStats | None:
        """Make the `role` engine hold `key`, pushing weights() if it holds something else.

        Every rank must call it with the same keys: the push gathers sharded parameters."""
        engine = self.by_role[role]
        if self.held.get(id(engine)) == key:
            return None
        self.held.pop(id(engine), None)  # a push that fails half way leaves nothing valid
        # Its weights are about to be overwritten: they sleep dropped (vLLM level 2) with its KV
        # cache, so the push wakes the weights alone and the cache returns when it next generates.
        engine.sleep(keep_weights=False)
        stats = push_weights(weights(), engine)
        self.held[id(engine)] = key
        return stats

    def generate(self, role: str, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[list[int]]:
        return self.by_role[role].generate(prompts, sampling, seed)

    def sleep_for_update(self, keep=None) -> None:
        """Give the device to the trainer. The rollout engine drops its weights (vLLM sleep level 2)
        unless it holds `keep` (after an update they are replaced by the tutee's anyway); a
        separate tutor engine keeps its snapshot (level 1)."""
        rollout = self.by_role["rollout"]
        for engine in self.distinct():
            kept = engine is not rollout or (keep is not None and self.held.get(id(engine)) == keep)
            if not engine.sleep(keep_weights=kept):
                self.held.pop(id(engine), None)

    def close(self) -> None:
        for engine in self.distinct():
            engine.close()
