"""Triton (GPU) kernels. Nothing here touches a GPU at import time."""
