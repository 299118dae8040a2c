"""The CUDA half of the bucket protocol, without vLLM: a process started the way vLLM's engine is
started (only this rank's GPU visible) maps the trainer's bucket from a handle of plain data that
went through msgpack, reads what the trainer wrote, and refuses a handle from another GPU.

    python benchmarks/ipc_check.py      (on a CUDA machine; prints one line)
"""
import multiprocessing as mp
import sys

import torch


def receiver(wire: bytes, conn) -> None:
    import msgpack

    from opcod.weight_sync import open_bucket
    handle = msgpack.unpackb(wire)
    device = torch.device("cuda", 0)  # what the engine process sees: only the trainer's GPU
    try:
        buf = open_bucket(handle, device)
        conn.send(("read", int(buf[:4096].to(torch.int64).sum()), torch.cuda.device_count()))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}", torch.cuda.device_count()))
    try:
        open_bucket({**handle, "gpu_uuid": "00000000-0000-0000-0000-000000000000"}, device)
        conn.send(("foreign", "accepted"))
    except RuntimeError as exc:
        conn.send(("foreign", str(exc)))


def main() -> int:
    import msgpack

    from opcod.engine_vllm import _engine_environment
    from opcod.weight_sync import shared_bucket
    device = torch.device("cuda", torch.cuda.current_device())
    buf, handle = shared_bucket(1 << 20, device)
    buf[:4096] = (torch.arange(4096, device=device) % 251).to(torch.uint8)
    torch.cuda.synchronize()
    want = int((torch.arange(4096) % 251).sum())
    wire = msgpack.packb(handle)  # no pickle: it would refuse anything but plain data
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    with _engine_environment(device, None):
        proc = ctx.Process(target=receiver, args=(wire, child))
        proc.start()
    read, foreign = parent.recv(), parent.recv()
    proc.join(60)
    ok = read[0] == "read" and read[1] == want and "each rank's engines must run" in foreign[1]
    print(f"ipc bucket: {'ok' if ok else 'FAILED'} (handle {len(wire)} bytes of plain data; receiver saw "
          f"{read[2]} GPU(s) and read {read[1]} (want {want}); foreign GPU handle: {foreign[1][:80]})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
