"""Routing: pure decision functions over candidate endpoints (see framework.py)."""

from dgemma_gateway.routing.framework import (
    Decision,
    Pipeline,
    ProfileError,
    load_profile,
    load_profile_file,
    route,
)
from dgemma_gateway.routing.overflow import may_overflow, route_with_overflow

__all__ = ["Decision", "Pipeline", "ProfileError", "load_profile", "load_profile_file", "may_overflow", "route",
           "route_with_overflow"]
