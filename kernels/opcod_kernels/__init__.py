"""opcod_kernels: fused linear + generalized-JSD distillation loss without [N, V] logits."""
if __name__ != "opcod_kernels":
    # From a checkout's root, `kernels/` is a namespace folder: `kernels.opcod_kernels` would be a
    # second copy of this package and register the torch.library ops twice.
    raise ImportError(f"import opcod_kernels, not {__name__} (pip install ./kernels)")

from .fused import FusedLinearJSD, default_chunk_size, fused_linear_jsd, jsd
from .logprobs import fused_linear_logprobs, reference_logprobs
from .reference import reference_fused_linear_jsd, reference_jsd

__all__ = ["fused_linear_jsd", "jsd", "FusedLinearJSD", "reference_fused_linear_jsd",
           "reference_jsd", "default_chunk_size", "fused_linear_logprobs", "reference_logprobs"]
