"""Triton kernels and their launchers (imported lazily: Triton is needed only where they run)."""
