"""Megatron-style tensor parallelism for Libra (each block: one "f" at its entry, TP-local compute, one "g" at
its exit) with data parallelism on top."""
