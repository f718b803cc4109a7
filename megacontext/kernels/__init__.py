"""Triton kernels, each beside its PyTorch reference.

Kernels load lazily: importing this package needs neither Triton nor a GPU. On
CUDA tensors the modules call the Triton kernels; on the CPU they call the
references. ``TRITON_INTERPRET=1`` runs the kernels on the CPU (the tests do).
``MEGACONTEXT_KERNELS=reference|triton`` forces one path.
"""
