"""Pure renderers: API objects in, plain dicts out (no Kubernetes client, no torch)."""
