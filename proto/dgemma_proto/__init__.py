"""dgemma_proto."""
