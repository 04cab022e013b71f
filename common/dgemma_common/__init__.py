"""dgemma_common: what crosses process boundaries (torch-free; imported by the worker, gateway and operator)."""
