"""Building blocks of the Libra decoder on the sorted modality layout: rotary embeddings, routed norms and
low-rank experts, bridge attention, the routed MLP, the hybrid input embedding and the bridge KV cache."""
