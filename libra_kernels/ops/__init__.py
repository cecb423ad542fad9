"""One file per operator, named after it (``routed_linear``, ``routed_projections``, ``routed_rms_norm``,
``bridge_attention``, ``discrete_token_cross_entropy``, ``modality_layout``): its kernels' launchers, registered
op, autograd and pure-PyTorch reference. Beside them: ``bridge_attention_triton.py`` (the Triton kernels of bridge
attention) and ``vocab_parallel.py`` (the vocab-parallel protocol of the loss)."""
