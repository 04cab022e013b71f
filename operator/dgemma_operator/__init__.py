"""dgemma_operator."""
