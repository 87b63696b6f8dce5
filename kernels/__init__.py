"""Triton kernels of rlkern (importable as ``rlkern.kernels``; they import only triton)."""
