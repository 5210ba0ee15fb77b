"""Triton kernels of the LLM engine (GPU), and ``dispatch``: the one place that chooses between them and
the torch reference path (CPU, and any device where Triton cannot run)."""
