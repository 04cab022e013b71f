"""Routing: pure decision functions over candidate endpoints (see framework.py)."""

from dgemma_gateway.routing.framework import (
    Decision,
    Pipeline,
    ProfileError,
    load_profile,
    load_profile_file,
    route,
)

__all__ = ["Decision", "Pipeline", "ProfileError", "load_profile", "load_profile_file", "route"]
