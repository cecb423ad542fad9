"""One file per operator, named after it (``routed_linear``, ``routed_projections``, ``routed_swiglu``,
``routed_rms_norm``, ``rotary``, ``bridge_attention``, ``discrete_token_cross_entropy``, ``modality_layout``): its
kernels' launchers, registered op, autograd and pure-PyTorch reference. Beside them: the Triton kernels in
``<op>_triton.py`` (``bridge_attention_triton.py``, ``routed_swiglu_triton.py``, ``rotary_triton.py``) and
``vocab_parallel.py`` (the vocab-parallel protocol of the loss)."""
