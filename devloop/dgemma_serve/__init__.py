"""dgemma_serve: the local dev loop (`dgemma serve`): a gateway and local worker processes in one command."""
