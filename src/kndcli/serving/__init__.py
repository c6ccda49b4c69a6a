"""The HTTP service: app factory, routes, limits, micro-batching and metrics."""
