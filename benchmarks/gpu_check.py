"""The Python stages of benchmarks/gpu_check.sh (a full-size CUDA-IPC push, FSDP2 at Qwen3-8B width
against opcod.plan) and its one table.

    python benchmarks/gpu_check.py ipc|fsdp --out DIR [--smoke]
    python benchmarks/gpu_check.py table --out DIR [--seconds S]

Each stage writes DIR/<stage>.json, {"rows": [[check, status, result], ...]}, and `table` prints
those rows with the kernel tests' and benchmarks' (DIR/kernels.log, DIR/bench.json). --smoke runs
the same code on the CPU at toy shapes, so CI runs every line of it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

GIB = 1 << 30
# Qwen3-8B's config.json sizes (8.19 B parameters, 399 tensors); the FSDP stage keeps its width and
# vocabulary with fewer layers, so that two students and an AdamW state fit one 80 GB GPU.
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                max_position_embeddings=40960, rope_theta=1000000.0)
TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, max_position_embeddings=2048,
           rope_theta=10000.0)
FSDP_LAYERS = 4
# The delayed receiver: on a GPU a spin kernel on the receiver's stream ahead of its copies (about
# 30 ms at 1.5-2 GHz, several of the driver's time slices). CPU copies are synchronous, so there the
# stream is stood in for: the copies run when the next message arrives, after the sender moved on.
DELAY_CYCLES = 50_000_000


def _row(check: str, status: str, result: str) -> list[str]:
    return [check, status, result]


def _size(nbytes: float) -> str:
    """Bytes in decimal units that stay readable from toy shapes to 16 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _rate(nbytes: float, seconds: float) -> str:
    return f"{_size(nbytes / seconds)}/s" if seconds > 0 else "-"


class _Rows(list):
    """A stage's rows, rewritten to DIR/<stage>.json as each one comes: a stage stopped by its time
    limit keeps what it had measured."""

    def __init__(self, out: Path, stage: str):
        super().__init__()
        self.path, self.extra = out / f"{stage}.json", {}
        self.save()

    def append(self, row: list) -> None:
        super().append(row)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps({"rows": list(self), **self.extra}, indent=1))


def _on_sigterm(signum, frame):
    # `timeout` sends SIGTERM: raised here, it becomes the stage's FAILED row.
    raise TimeoutError("the stage's time limit in gpu_check.sh was reached")


def _param_shapes(shape: dict) -> dict[str, torch.Size]:
    """Names and shapes of a Qwen3 model of `shape`, without allocating it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**shape))
    return {n: p.shape for n, p in model.named_parameters()}


def _plain(obj):
    """`obj` as it arrives through vLLM's msgpack RPC: only plain data survives (no pickling)."""
    def check(x):
        if isinstance(x, dict):
            for k, v in x.items():
                check(k)
                check(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                check(v)
        elif not isinstance(x, (str, int, float, bool, bytes, type(None))):
            raise TypeError(f"{type(x).__name__} would not cross vLLM's msgpack serializer")
    check(obj)
    try:
        import msgpack
    except ImportError:  # the check above is what msgpack would refuse
        return obj
    return msgpack.unpackb(msgpack.packb(obj))


# ----------------------------------------------------------------------------- IPC push


def _receiver(handle: dict, conn, shape: dict) -> None:
    """A process started as an engine is (spawned, only the trainer's GPU visible) that maps the
    bucket from its plain handle and loads every bucket into a transformers model through the
    engines' own receiving code (opcod.weight_sync.receive_bucket, the vLLM worker's path)."""
    try:
        from opcod.engine_hf import load_into
        from opcod.weight_sync import gpu_uuid, open_bucket, receive_bucket, synchronize_device
        cuda = handle["kind"] == "cuda"
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
            x = torch.ones(64, 64, device=device)
            (x @ x).sum().item()  # the context and cuBLAS's workspace, as any engine has them
        conn.send(("ok", {"device_count": torch.cuda.device_count() if cuda else 0,
                          "uuid": gpu_uuid(device) if cuda else None,
                          "reserved": torch.cuda.memory_reserved(device) if cuda else 0}))
        conn.recv()  # go on once the trainer has measured this process's context
        buffer = open_bucket(handle, device)
        from transformers import Qwen3Config, Qwen3ForCausalLM
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("meta"):
            model = Qwen3ForCausalLM(Qwen3Config(**shape))
        torch.set_default_dtype(torch.float32)
        model.to_empty(device=device)
        params = {n: p.detach() for n, p in model.named_parameters()}
        conn.send(("ok", None))
        refs, pending = None, []
        while True:
            cmd, *args = conn.recv()
            for work in pending:  # the CPU stand-in's queued copies run now
                work()
            pending.clear()
            if cmd == "refs":  # the trainer's tensors, mapped to compare against (the check, not the protocol)
                refs = args[0]
            elif cmd == "load":
                metas, mode = args

                def work(metas=metas, sync=mode["sync"]):
                    with torch.no_grad():
                        receive_bucket(buffer, metas, lambda w: load_into(params, w), clone=True, synchronize=sync)
                if mode["delay"] and cuda:
                    torch.cuda._sleep(DELAY_CYCLES)  # the copies queue behind it on this stream
                    work()
                elif mode["delay"] and not mode["sync"]:
                    pending.append(work)
                else:
                    work()
            elif cmd == "finish":
                synchronize_device(device)  # as the vLLM worker's opcod_finish_load
            elif cmd == "verify":
                synchronize_device(device)
                bad = [n for n in params if not torch.equal(params[n], refs[n])]
                conn.send(("ok", bad))
                continue
            elif cmd == "close":
                conn.send(("ok", None))
                return
            conn.send(("ok", None))
    except Exception:  # noqa: BLE001 - the trainer reports it
        conn.send(("error", traceback.format_exc()))


class _Client:
    """The trainer's handle on the receiver: what opcod.weight_sync.push_weights expects of an engine."""

    def __init__(self, conn, buffer):
        self.conn, self.buffer, self.dtype = conn, buffer, None
        self.mode = {"delay": False, "sync": True}

    def call(self, *msg):
        self.conn.send(msg)
        if not self.conn.poll(300):
            raise RuntimeError("the receiver did not answer within 300 s")
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"receiver: {value}")
        return value

    def begin_load(self):
        pass

    def load_bucket(self, metas):
        self.call("load", _plain(metas), self.mode)

    def finish_load(self):
        self.call("finish")


def _foreign(handle: dict, conn) -> None:
    from opcod.weight_sync import open_bucket
    try:
        open_bucket(handle, torch.device("cuda", 0))
        conn.send("mapped")
    except RuntimeError as exc:
        conn.send(str(exc))


def ipc_stage(out: Path, smoke: bool) -> None:
    import torch.multiprocessing as mp

    from opcod.engine_vllm import _engine_environment
    from opcod.plan import ENGINE_ASLEEP_GIB
    from opcod.weight_sync import ALIGN, gpu_uuid, push_weights, release_handle, shared_bucket
    rows = _Rows(out, "ipc")
    cuda = not smoke
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    shape = TOY if smoke else QWEN3_8B
    gen = torch.Generator(device).manual_seed(0)
    weights = {n: torch.empty(s, dtype=torch.bfloat16, device=device) for n, s in _param_shapes(shape).items()}

    def perturb():  # fresh values each time: a stale or misplaced copy cannot look right
        for t in weights.values():
            t.normal_(generator=gen)
    perturb()
    total = sum(t.numel() * t.element_size() for t in weights.values())
    rows.extra.update(bytes=total, tensors=len(weights))
    largest = max(t.numel() * t.element_size() for t in weights.values())
    # As opcod.weight_sync.bucket_bytes_for: the configured size (512 MiB), grown to the largest tensor.
    bucket = max((64 << 10) if smoke else (512 << 20), (largest + ALIGN - 1) // ALIGN * ALIGN)
    buffer, handle = shared_bucket(bucket, device)
    wire = _plain(handle)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    free0 = torch.cuda.mem_get_info(device)[0] if cuda else 0
    with _engine_environment(device, 1 if smoke else None):
        proc = ctx.Process(target=_receiver, args=(wire, child, shape), daemon=True)
        proc.start()
    client = _Client(parent, buffer)
    try:
        if not parent.poll(300):
            raise RuntimeError("the receiver did not start within 300 s")
        status, seen = parent.recv()
        if status == "error":
            raise RuntimeError(seen)
        context = (free0 - torch.cuda.mem_get_info(device)[0] - seen["reserved"]) if cuda else 0
        client.call("go")
        release_handle(handle)  # mapped by now (CPU: the name is unlinked)
        client.call("refs", weights)
        n = len(weights)
        stats = []
        for i in (1, 2):
            if i == 2:
                perturb()
            s = push_weights(weights.items(), client)
            bad = client.call("verify")
            stats.append(s.seconds)
            rows.append(_row(f"ipc push {i}{' (perturbed)' if i == 2 else ''}: {n} tensors, {_size(total)}",
                             "ok" if not bad else "FAILED",
                             f"bit-equal {n - len(bad)}/{n}; {s.seconds:.3f} s, {_rate(s.bytes, s.seconds)}, "
                             f"{s.buckets} buckets of {_size(bucket)}" + (f"; differ: {bad[:3]}" if bad else "")))
        how = "a spin kernel ahead of its copies" if cuda else "CPU stand-in: copies run at the next message"
        for sync in (False, True):
            perturb()
            client.mode = {"delay": True, "sync": sync}
            push_weights(weights.items(), client)
            bad = client.call("verify")
            client.mode = {"delay": False, "sync": True}
            if sync:
                rows.append(_row("delayed receiver, synchronized (the fix)", "ok" if not bad else "FAILED",
                                 f"bit-equal {n - len(bad)}/{n} ({how})"))
            else:  # defect 1 of issue 29: shown, or the race did not occur this time
                rows.append(_row("delayed receiver, not synchronized (issue 29.1)", "shown" if bad else "not shown",
                                 f"{len(bad)}/{n} tensors differ ({how})"))
        if cuda:
            ok = seen["uuid"] == gpu_uuid(device)
            rows.append(_row("ipc placement", "ok" if ok else "FAILED",
                             f"receiver saw {seen['device_count']} GPU(s); its cuda:0 is "
                             f"{'the trainer GPU' if ok else seen['uuid']} (UUID)"))
            rows.append(_row("receiver process: CUDA context + cuBLAS", "info",
                             f"{context / GIB:.2f} GiB (plan's ENGINE_ASLEEP_GIB {ENGINE_ASLEEP_GIB:g}; a vLLM "
                             "process holds more: NCCL, its allocator's cache)"))
        else:
            rows.append(_row("ipc placement", "n/a", "CPU: a shared-memory bucket, no GPU to place"))
        if cuda and torch.cuda.device_count() > 1:
            other = torch.device("cuda", 1)
            p2, c2 = ctx.Pipe()
            with _engine_environment(other, None):
                proc2 = ctx.Process(target=_foreign, args=(wire, c2), daemon=True)
                proc2.start()
            said = p2.recv() if p2.poll(120) else "no answer"
            proc2.join(30)
            rows.append(_row("ipc handle on another GPU", "ok" if "must run on that rank's GPU" in said else "FAILED",
                             said[:100]))
        else:
            rows.append(_row("ipc handle on another GPU", "n/a",
                             "one GPU here; the UUID guard is tested on CPU (tests/test_engine_protocol.py)"))
        client.call("close")
    except Exception as exc:  # noqa: BLE001 - a stage failure is a table row, the others still run
        rows.append(_row("ipc stage", "FAILED", f"{type(exc).__name__}: {exc}"[:300]))
        traceback.print_exc()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


# ----------------------------------------------------------------------------- FSDP2 at 8B width


class _BucketOnly:
    """A push without a receiver: the trainer's side of the sync (gathered tensors, their
    engine-dtype copies, the bucket), every bucket dropped once packed."""

    def __init__(self, buffer, dtype):
        self.buffer, self.dtype = buffer, dtype

    def begin_load(self):
        pass

    def load_bucket(self, metas):
        pass

    def finish_load(self):
        pass


def _model_dir(root: Path, shape: dict, device: torch.device) -> tuple[Path, object]:
    """A random Qwen3 of `shape` saved in bf16 with a small tokenizer (ids past it are never
    sampled; every GEMM and buffer has the full vocabulary's shape)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opcod.tiny import build_tokenizer
    tok = build_tokenizer(["The molar mass of water is 18.02 g/mol.", "Please reason step by step."] * 20,
                          vocab_size=300)
    cfg = Qwen3Config(**shape, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    path = root / "student"
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path, tok


@contextlib.contextmanager
def _phase(measured: dict, name: str, cuda: bool):
    if cuda:  # cached segments of an earlier phase would count as this one's reserved peak
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize()
    measured[name] = {"s": time.perf_counter() - t0,
                      "allocated": torch.cuda.max_memory_allocated() / GIB if cuda else None,
                      "reserved": torch.cuda.max_memory_reserved() / GIB if cuda else None}


def _locals(opt) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor
    return [v.to_local() if isinstance(v, DTensor) else v for s in opt.state.values() for v in s.values()
            if torch.is_tensor(v) and v.dim() > 0]


def fsdp_stage(out: Path, smoke: bool) -> None:
    import torch.distributed as dist

    from opcod import checkpoint
    from opcod.config import load_config
    from opcod.data import Problem
    from opcod.distributed import init_distributed, quiet_transformers
    from opcod.models import (apply_update, init_optimizer_state, load_student, make_optimizer,
                              move_optimizer_state)
    from opcod.plan import CUDA_CONTEXT_GIB, H200_GIB, make_plan
    from opcod.step import Rollout, distill_backward, loss_denominator, pack
    from opcod.weight_sync import bucket_bytes_for, iter_full_params, push_weights
    rows = _Rows(out, "fsdp")
    extra = rows.extra
    quiet_transformers()
    _, _, device = init_distributed()  # one rank; on a GPU the trainer's cuda:nccl,cpu:gloo group
    cuda = device.type == "cuda"
    if cuda == smoke:
        raise SystemExit("gpu_check fsdp: --smoke runs on the CPU, the full check needs a GPU")
    host = torch.device("cpu")
    shape = dict(TOY, num_hidden_layers=FSDP_LAYERS) if smoke else dict(QWEN3_8B, num_hidden_layers=FSDP_LAYERS)
    # The paper's lengths (configs/phys_chem.yaml) at micro-batch 2; toy lengths on the CPU.
    response, context, solution, feedback, micro = (16, 32, 8, 8, 2) if smoke else (8192, 12288, 4096, 1024, 2)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=os.environ.get("GPU_CHECK_TMP")))
    try:
        if cuda:  # the trainer's context, NCCL's communicator and cuBLAS exist before anything is measured
            x = torch.ones(64, 64, device=device)
            dist.all_reduce(x)
            (x @ x).sum().item()
            free, total = torch.cuda.mem_get_info(device)
            ctx = (total - free - torch.cuda.memory_reserved(device)) / GIB
            rows.append(_row("trainer process: CUDA context + NCCL + cuBLAS", "info",
                             f"{ctx:.2f} GiB (plan's CUDA_CONTEXT_GIB {CUDA_CONTEXT_GIB:g})"))
            extra["trainer_context_gib"] = ctx
        model_dir, tok = _model_dir(work, shape, device)
        cfg = load_config(base={
            "method": "opcod", "students": [{"name": "A", "path": str(model_dir)}, {"name": "B", "path": str(model_dir)}],
            "engine": {"kind": "vllm", "tutor": "separate", "bucket_mb": 512, "max_model_len": context},
            "rollout": {"max_new_tokens": response},
            "loss": {"max_solution_tokens": solution, "max_feedback_tokens": feedback},
            "model": {"micro_batch_size": micro, "activation_checkpointing": True}})
        gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB if cuda else H200_GIB
        plan = make_plan(cfg, 1, gpu_gib)
        (out / "fsdp_plan.txt").write_text(plan.table() + "\n")
        t0 = time.perf_counter()
        students = {n: load_student(str(model_dir), device, None, activation_checkpointing=True) for n in "AB"}
        optims = {n: make_optimizer(s, 1e-5, 0.01, (0.9, 0.999), 0)[0] for n, s in students.items()}
        for opt in optims.values():
            init_optimizer_state(opt, host)  # as CoDistillation: AdamW's zero state made where it waits
        A, B = students["A"], students["B"]
        dtype = torch.bfloat16 if cuda else torch.float32
        # The engines' buckets are the trainer's memory (one per engine, as the plan counts them).
        buckets = [torch.empty(bucket_bytes_for(A, 512, dtype), dtype=torch.uint8, device=device) for _ in range(2)]
        move_optimizer_state(optims["B"], host)  # a phase start: the idle student's state leaves first
        move_optimizer_state(optims["A"], device)
        rows.append(_row(f"fsdp: 2 students of {plan.shape.params / 1e6:,.1f} M parameters ({FSDP_LAYERS} layers, "
                         f"H={shape['hidden_size']}, V={shape['vocab_size']})", "ok",
                         f"loaded, sharded (bf16 mixed precision: {cuda}, activation checkpointing) "
                         f"in {time.perf_counter() - t0:.1f} s"))

        g = torch.Generator().manual_seed(0)
        prob = Problem("p", "chemistry", "q", [("A", "a"), ("B", "b")], "A")

        def ids(n):
            return torch.randint(10, shape["vocab_size"], (n,), generator=g).tolist()
        prompt_len, teacher_len = context - response, context - response + solution + feedback + 64
        rollouts = []
        for _ in range(2 * micro):  # two micro-batches: gradients accumulate
            r = Rollout(prob, ids(prompt_len), ids(response), "", 0.0)
            r.teacher_prompt_ids = ids(teacher_len)
            rollouts.append(r)
        measured = {}
        with _phase(measured, "student", cuda):
            loss = distill_backward(A, A, rollouts, micro, tok.pad_token_id, device, 0.5,
                                    loss_denominator(rollouts, "sequence", device), "sequence")
        # The teacher's no-grad forward of a micro-batch with the gradients of the one before it
        # present, as in distill_backward's second micro-batch (what the plan's phase describes).
        with _phase(measured, "teacher", cuda), torch.no_grad():
            t_ids, t_mask, t_index = pack([(r.teacher_prompt_ids, r.response_ids) for r in rollouts[:micro]],
                                          tok.pad_token_id, device)
            A(t_ids, t_mask, t_index)
        A.reshard()  # FSDP2 keeps a root gathered after a forward without backward
        with _phase(measured, "optimizer", cuda):
            stepped, norm = apply_update(A, optims["A"], 1.0)
        with _phase(measured, "sync", cuda):
            sync = push_weights(iter_full_params(A, strip="lm."), _BucketOnly(buckets[0], dtype))
        finite = bool(torch.isfinite(loss)) and stepped
        rows.append(_row("fsdp: one OPCoD update step (fused loss, 2 micro-batches)", "ok" if finite else "FAILED",
                         f"loss {float(loss):.4g}, grad norm {norm:.3g}, stepped {stepped}; "
                         f"sync packed {_size(sync.bytes)} in {sync.buckets} buckets"))
        extra["phases"] = {}
        for phase, m in measured.items():
            want = sum(p.gib for p in plan.parts if phase in p.phases and p.owner == "trainer"
                       and not p.name.startswith("CUDA context"))
            extra["phases"][phase] = {"plan_gib": want, **m}
            if not cuda:
                rows.append(_row(f"fsdp {phase}: plan vs measured", "n/a",
                                 f"plan {want * 1024:.2f} MiB; no allocator to measure on the CPU ({m['s']:.2f} s)"))
                continue
            ratio = want / m["reserved"] if m["reserved"] else float("nan")
            rows.append(_row(f"fsdp {phase}: plan vs measured peak", "ok" if ratio >= 1 else "UNDER",
                             f"plan {want:.2f} GiB; measured {m['allocated']:.2f} allocated, {m['reserved']:.2f} "
                             f"reserved; plan/reserved {ratio:.2f} ({m['s']:.2f} s)"))

        # -- the idle student's optimizer state: to pinned host memory and back
        ref = [t.to(host, copy=True) for t in _locals(optims["A"])]
        state_bytes = sum(t.numel() * t.element_size() for t in ref)
        before = torch.cuda.memory_allocated(device) if cuda else 0
        t0 = time.perf_counter()
        move_optimizer_state(optims["A"], host)
        t_out = time.perf_counter() - t0
        freed = (before - torch.cuda.memory_allocated(device)) if cuda else 0
        t0 = time.perf_counter()
        move_optimizer_state(optims["A"], device)
        t_in = time.perf_counter() - t0
        same = sum(torch.equal(a.to(host), b) for a, b in zip(_locals(optims["A"]), ref))
        where = f"{_size(freed)} freed on the GPU" if cuda else "a no-op on the CPU (the host is the device)"
        rows.append(_row(f"optimizer state offload round trip ({_size(state_bytes)})",
                         "ok" if same == len(ref) and (not cuda or freed >= state_bytes) else "FAILED",
                         f"out {t_out:.2f} s, back {t_in:.2f} s, {where}; bit-equal {same}/{len(ref)}"))
        del ref

        # -- checkpoint: A's weights and optimizer state saved, loaded into B (untrained, its state on the host)
        need = sum(p.numel() * 4 for p in A.parameters()) + state_bytes
        free_disk = shutil.disk_usage(work).free
        if free_disk < 1.2 * need:
            rows.append(_row("checkpoint save/load", "skipped", f"{_size(need)} needed, {_size(free_disk)} free"))
        else:
            differed = sum(not torch.equal(a.to_local(), b.to_local()) for a, b in zip(A.parameters(), B.parameters()))
            t0 = time.perf_counter()
            checkpoint.save(work / "ckpt", "step", {"student": A}, {"student": (A, optims["A"])}, {}, {"stage": "fsdp"})
            t_save = time.perf_counter() - t0
            t0 = time.perf_counter()
            checkpoint.load(work / "ckpt" / "step", {"student": B}, {"student": (B, optims["B"])}, {})
            t_load = time.perf_counter() - t0
            params = sum(torch.equal(a.to_local(), b.to_local()) for a, b in zip(A.parameters(), B.parameters()))
            states = sum(torch.equal(a.to(host), b.to(host)) for a, b in zip(_locals(optims["A"]), _locals(optims["B"])))
            n_p, n_s = len(list(A.parameters())), len(_locals(optims["A"]))
            ok = params == n_p and states == n_s and differed > 0
            rows.append(_row(f"checkpoint save/load ({_size(need)}: weights + AdamW state)", "ok" if ok else "FAILED",
                             f"save {t_save:.1f} s, load {t_load:.1f} s; weights {params}/{n_p}, state {states}/{n_s} "
                             f"bit-equal ({differed} tensors differed before)"))
            shutil.rmtree(work / "ckpt", ignore_errors=True)

        # -- Hugging Face export, read back with safetensors
        from safetensors import safe_open
        t0 = time.perf_counter()
        checkpoint.export_hf(A, tok, work / "export")
        t_exp = time.perf_counter() - t0
        files = sorted((work / "export").glob("*.safetensors"))
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
            where = {name: r for r in readers for name in r.keys()}
            equal = count = 0
            for name, full in iter_full_params(A, strip="lm."):  # one gathered tensor at a time
                count += 1
                if name in where:
                    t = where[name].get_tensor(name)
                    equal += torch.equal(t, full.to(device="cpu", dtype=t.dtype))
        size = sum(f.stat().st_size for f in files)
        ok = count == len(where) and equal == count and (work / "export" / "config.json").is_file()
        rows.append(_row(f"HF export ({_size(size)})", "ok" if ok else "FAILED",
                         f"{t_exp:.1f} s; {equal}/{count} tensors bit-equal to the trainer's (cast to the "
                         f"file's dtype, {len(where)} in the file)"))
    except Exception as exc:  # noqa: BLE001 - a stage failure is a table row
        rows.append(_row("fsdp stage", "FAILED", f"{type(exc).__name__}: {exc}"[:300]))
        traceback.print_exc()
    finally:
        rows.save()
        shutil.rmtree(work, ignore_errors=True)
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the one table


def kernel_rows(out: Path) -> list:
    rows = []
    log = out / "kernels.log"
    lines = [x for x in log.read_text().splitlines() if " passed" in x or " failed" in x or " error" in x] \
        if log.is_file() else []
    summary = lines[-1].strip("= ") if lines else "no result"
    rows.append(_row("kernels vs float64 reference (pytest)",
                     "ok" if "passed" in summary and "failed" not in summary and "error" not in summary else "FAILED",
                     summary))
    bench = out / "bench.json"
    if not bench.is_file():
        return rows + [_row("kernel benchmarks", "FAILED", "no bench.json (see bench.log)")]
    data = json.loads(bench.read_text())
    by_n: dict[int, dict] = {}
    for r in data["rows"]:
        by_n.setdefault(r["n"], {})[r["impl"]] = r
    head = f"{data['device']} {data['dtype']} H={data['H']} V={data['V']}"
    for n in sorted(by_n):
        row = by_n[n]
        floor = row.get("gemm_floor", {})
        for impl, r in row.items():
            ms, mib = r.get("ms"), r.get("mib")
            if ms is None:
                continue
            text = f"{ms:.1f} ms, peak {mib:.0f} MiB"
            if impl != "gemm_floor" and floor.get("ms"):
                text += f"; {ms / floor['ms']:.2f}x the fused op's GEMMs"
            # Each implementation against ours of the same objective (exact, or SDPO's top-100 + tail).
            ours = row.get("fused_top100" if impl.endswith("_top100") else "fused", {})
            if impl not in ("fused", "fused_top100", "gemm_floor") and ours.get("ms"):
                text += f"; ours {ms / ours['ms']:.2f}x faster, at {ours['mib'] / mib:.2f}x the memory"
            rows.append(_row(f"kernel N={n} {impl} ({head})", "ok", text))
    return rows


def table(out: Path, seconds: int | None) -> int:
    rows = kernel_rows(out)
    for stage in ("ipc", "fsdp"):
        path = out / f"{stage}.json"
        rows += json.loads(path.read_text())["rows"] if path.is_file() else \
            [_row(f"{stage} stage", "FAILED", f"no {stage}.json (see {stage}.log)")]
    env = (out / "env.txt").read_text().strip().replace("\n", "; ") if (out / "env.txt").is_file() else ""
    w = max(len(r[0]) for r in rows)
    print(f"gpu_check: {env}" + (f"; {seconds} s" if seconds is not None else ""))
    print(f"{'check':<{w}}  {'status':<9}  result")
    print("-" * (w + 40))
    for check, status, result in rows:
        print(f"{check:<{w}}  {status:<9}  {result}")
    failed = [r[0] for r in rows if r[1] == "FAILED"]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["ipc", "fsdp", "table"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="on the CPU at toy shapes")
    ap.add_argument("--seconds", type=int, help="the whole check's wall time, for the table's title")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "table":
        return table(args.out, args.seconds)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check {args.stage}: no GPU visible (use --smoke on a CPU)")
    import signal
    signal.signal(signal.SIGTERM, _on_sigterm)
    (ipc_stage if args.stage == "ipc" else fsdp_stage)(args.out, args.smoke)
    rows = json.loads((args.out / f"{args.stage}.json").read_text())["rows"]
    failed = [r[0] for r in rows if r[1] == "FAILED"]
    print(f"{args.stage}: {len(rows)} checks" + (f", FAILED: {', '.join(failed)}" if failed else ", none failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
