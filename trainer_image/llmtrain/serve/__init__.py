"""Serving a model directory: an OpenAI-compatible completions server and the ONNX export.

Data flow: ``cli`` parses flags -> ``loader`` loads the model -> ``engine`` schedules requests onto
``batch`` (the model state of the running sequences, KV cache included), which samples with
``sampling``; ``text`` turns token ids into streamed text and applies stop strings; ``app`` is the
HTTP layer (``protocol`` validates requests, ``errors`` shapes error bodies, ``metrics`` counts).
``onnx_export``/``onnx_cli`` export and verify an ONNX graph of the same model.
"""
