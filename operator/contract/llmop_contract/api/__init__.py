"""The llmop API: typed models that are the single source of truth for the CRDs."""
