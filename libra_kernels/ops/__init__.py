"""One file per operator: its kernels' launchers, registered op, autograd and pure-PyTorch reference."""
