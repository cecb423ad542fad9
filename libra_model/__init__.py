"""The Libra model on the fused operators of ``libra_kernels``: configuration, modules, tokenizers, checkpoint
import/export, generation, data pipelines and the tensor-parallel trainer."""
