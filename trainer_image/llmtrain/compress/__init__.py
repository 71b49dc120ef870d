"""``llmtrain compress``: quantise, prune or distil the trained model, and compare it with the original.

Entry point ``llmtrain.compress.cli.main``; loading of every layout in ``llmtrain.compress.load``.
"""
