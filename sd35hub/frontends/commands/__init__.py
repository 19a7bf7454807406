"""CLI commands, one module per area; each exposes ``register(app)``. Errors propagate to sd35hub.frontends.cli."""
