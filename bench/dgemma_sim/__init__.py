"""Simulations of the gateway's routing and the autoscaler, driven by the real `route` and `decide`."""
