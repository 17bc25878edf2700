"""restwise.server: ServerApp composition, run management, FastAPI service, dashboard, server CLI."""
