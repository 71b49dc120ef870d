"""llmop: a Kubernetes operator that carries LLM training runs through their whole lifecycle."""

__version__ = "0.1.0"
