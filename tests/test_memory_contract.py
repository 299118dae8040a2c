"""The fused loss never allocates an [N, V] tensor: its largest allocation is O(chunk x V)."""
import torch
from torch.profiler import ProfilerActivity, profile

import opcod_kernels as K


def largest_allocation(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_largest_allocation_is_per_chunk_not_per_token():
    torch.manual_seed(0)
    N, H, V, chunk = 2048, 32, 4096, 64
    hs = torch.randn(N, H, requires_grad=True)
    ht = torch.randn(N, H)
    W = (torch.randn(V, H) / H ** 0.5).requires_grad_()
    full = N * V * 4  # one fp32 [N, V] tensor: 32 MiB

    def fused():
        K.fused_linear_jsd(hs, ht, W, chunk_size=chunk, backend="cpp").backward()

    def naive():
        K.reference_fused_linear_jsd(hs.float(), ht, W).backward()

    fused_peak = largest_allocation(fused)
    workspace = 2 * chunk * V * 4  # the chunk's student + teacher fp32 logits
    assert fused_peak <= max(workspace, V * H * 4), (fused_peak, workspace)
    assert fused_peak * 8 <= full
    # The same probe does see the materializing implementation's [N, V] tensors.
    assert largest_allocation(naive) >= full
