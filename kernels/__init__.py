"""opcod_kernels: fused linear + generalized-JSD distillation loss without [N, V] logits."""
from .fused import FusedLinearJSD, default_chunk_size, fused_linear_jsd, jsd
from .logprobs import fused_linear_logprobs, reference_logprobs
from .reference import reference_fused_linear_jsd, reference_jsd

__all__ = ["fused_linear_jsd", "jsd", "FusedLinearJSD", "reference_fused_linear_jsd",
           "reference_jsd", "default_chunk_size", "fused_linear_logprobs", "reference_logprobs"]
