"""dgemma_worker."""
