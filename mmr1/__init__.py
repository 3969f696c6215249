"""mmr1: a lean PyTorch implementation of MM-R1 on top of mmr1_kernels."""
__version__ = "0.1.0"
