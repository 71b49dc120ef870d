"""llmtrain: the code that runs inside training pods (prepare, train, compress, serve)."""
