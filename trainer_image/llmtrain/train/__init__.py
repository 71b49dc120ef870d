"""Training: a small loop (loop.py) over single-purpose components."""
