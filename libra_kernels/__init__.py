"""Fused operators for Libra: routed projections, routed RMSNorm, the routed SwiGLU tail, RoPE of q/k/k_bridge, bridge
attention and the discrete-token softmax.

Every operator takes ``backend="auto" | "torch" | "triton" | "cpp"`` ("torch" is the PyTorch reference; "auto"
picks the fastest available for the device; ``LIBRA_BACKEND`` changes what "auto" prefers for a whole run) and is
a registered ``torch.ops.libra.*`` operator with a fake implementation. The C++ extension is loaded lazily: this
package imports without it, and only asking for the "cpp" backend raises, saying how to build it.
"""

from libra_kernels._ext import cpp_extension_loaded
from libra_kernels.ops.bridge_attention import bridge_attention, bridge_attention_ref
from libra_kernels.ops.discrete_token_cross_entropy import (
    discrete_token_cross_entropy,
    discrete_token_cross_entropy_ref,
)
from libra_kernels.ops.modality_layout import ModalityLayout
from libra_kernels.ops.rotary import rotary, rotary_ref
from libra_kernels.ops.routed_linear import routed_linear, routed_linear_ref
from libra_kernels.ops.routed_projections import pack_rows, routed_projections, routed_projections_ref
from libra_kernels.ops.routed_rms_norm import routed_rms_norm, routed_rms_norm_ref
from libra_kernels.ops.routed_swiglu import routed_swiglu, routed_swiglu_ref

__all__ = [
    "ModalityLayout",
    "bridge_attention",
    "bridge_attention_ref",
    "cpp_extension_loaded",
    "discrete_token_cross_entropy",
    "discrete_token_cross_entropy_ref",
    "pack_rows",
    "rotary",
    "rotary_ref",
    "routed_linear",
    "routed_linear_ref",
    "routed_projections",
    "routed_projections_ref",
    "routed_rms_norm",
    "routed_rms_norm_ref",
    "routed_swiglu",
    "routed_swiglu_ref",
]
