"""The backends of each operator that can run on this machine, for parametrising the kernel tests."""

import torch

from libra_kernels.ops import bridge_attention, routed_linear
from libra_kernels.ops import discrete_token_cross_entropy as cross_entropy
from libra_kernels.ops import routed_rms_norm as rms_norm


def runnable(table, device="cpu"):
    """Backends of a KernelTable that can run on ``device`` here (the reference "torch" always can)."""
    return [name for name, kernel in table.kernels.items() if not kernel.unavailable(torch.device(device))]


RMS_NORM = runnable(rms_norm.TABLE)
ROUTED_LINEAR = runnable(routed_linear.TABLE)
ROUTED_LINEAR_GROUPED = runnable(routed_linear.GROUPED_TABLE)
BRIDGE_ATTENTION = runnable(bridge_attention.TABLE)
CROSS_ENTROPY = runnable(cross_entropy.TABLE)
