"""dgemma_cli: the `dgemma` command."""
