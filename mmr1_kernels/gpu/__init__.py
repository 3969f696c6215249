"""Triton GPU kernels (imported only when triton is installed)."""
