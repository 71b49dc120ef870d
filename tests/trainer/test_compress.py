"""`llmtrain compress`: quantisation, pruning and distillation of a really trained model, evaluated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmtrain.compress.layout import FORMAT, LAYOUT_QUANTIZED, MARKER, copy_side_files, write_json
from llmtrain.compress.load import load_model, load_tokenizer
from llmtrain.compress.quantize import quantize_model, tensors_to_save
from tests.trainer.conftest import TrainedModel


def test_load_model_reads_the_export_and_a_saved_quantised_model(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    model: Any = load_model(trained_model.model_dir)
    tok = load_tokenizer(trained_model.model_dir)
    ids = tok("The licence grants you", return_tensors="pt")["input_ids"]
    quantized: Any = load_model(trained_model.model_dir)  # a LlamaForCausalLM
    formats = quantize_model(quantized, "Int8WeightOnly", 64, tied=True)
    save_file(tensors_to_save(quantized, tied=True), str(tmp_path / "model.safetensors"))
    quantized.config.save_pretrained(tmp_path)
    copy_side_files(trained_model.model_dir, tmp_path)
    write_json(tmp_path / MARKER, {"format": FORMAT, "layout": LAYOUT_QUANTIZED, "modules": formats})
    reloaded: Any = load_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, quantized(ids).logits, rtol=0, atol=0)
        greedy = reloaded.generate(ids, max_new_tokens=8, do_sample=False)
        reference = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert greedy.shape == reference.shape == (1, ids.shape[1] + 8)
