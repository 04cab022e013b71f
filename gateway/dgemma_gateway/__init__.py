"""dgemma_gateway."""
