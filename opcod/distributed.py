"""Process-group setup, the rank-0 print, cross-rank sums and derived seeds, for every entry point."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (or make a one-process group for plain `python -m`); each
    rank uses the GPU of its LOCAL_RANK when CUDA is there."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # Small bookkeeping tensors (feedback outcomes, scores) live on the CPU: gloo carries those.
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    warn_cuda_torch_without_gpu()
    return dist.get_rank(), dist.get_world_size(), device


def warn_cuda_torch_without_gpu() -> None:
    """One line (rank 0) when a CUDA build of torch finds no GPU: everything runs on the CPU, and a
    CPU-only machine is better served by the CPU build (a bare `pip install torch` pulls CUDA's)."""
    if torch.version.cuda is None or torch.cuda.is_available():
        return
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    print(f"opcod: torch {torch.__version__} is a CUDA build but no GPU is visible, so this runs on the CPU; "
          f"on a machine without a GPU, pip install torch=={torch.__version__.split('+')[0]} --index-url "
          "https://download.pytorch.org/whl/cpu (the CPU build) saves several GB", file=sys.stderr, flush=True)


def device_of_rank() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def seed_for(*parts: int) -> int:
    """A 32-bit seed derived from any tuple of integers (the run seed, a round, a step, a rank...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


_ON_ORPHAN: list[Callable[[], None]] = []


def on_orphan(fn: Callable[[], None]) -> None:
    """Run fn (say, releasing the run's lock) if this worker stops because its launcher died."""
    _ON_ORPHAN.append(fn)


def watch_launcher(poll_s: float = 0.5) -> None:
    """Under torchrun, stop within a second once the launcher is gone (a killed torchrun leaves its
    workers running, and they would go on writing the run directory beside a rerun)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != launcher:
                print(f"rank {os.environ.get('RANK', '?')}: the launcher (pid {launcher}) is gone; stopping",
                      file=sys.stderr, flush=True)
                for fn in _ON_ORPHAN:
                    try:
                        fn()
                    except Exception:  # noqa: BLE001 - exiting anyway
                        pass
                os._exit(70)
    threading.Thread(target=watch, name="opcod-launcher-watch", daemon=True).start()
