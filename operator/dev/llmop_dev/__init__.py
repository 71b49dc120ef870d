"""Development tooling: a real local control plane (kwok) and, later, a local pod runtime."""
