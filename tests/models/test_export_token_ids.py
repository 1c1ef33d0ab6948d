"""An HF export keeps the special token ids of the checkpoint training started from: a Qwen3-*-Base model ends
documents with <|endoftext|> (151643), and an export that claimed the chat models' <|im_end|> (151645) would
never stop generating. A random initialisation keeps the chat models' ids."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from mirotrain.checkpoint.hf_checkpointer import FullModelHFCheckpointer
from mirotrain.models import build_model, from_pretrained, save_pretrained
from mirotrain.models.qwen3.tokenizer import bundled_tokenizer_dir

BASE_IDS = {"bos_token_id": 151643, "eos_token_id": 151643}  # as in Qwen3-8B-Base's config.json
GENERATION = {"bos_token_id": 151643, "eos_token_id": 151643, "max_new_tokens": 2048, "do_sample": False}


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """A tiny random Qwen3 checkpoint with a -Base model's token ids and generation config."""
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **BASE_IDS)
    out = tmp_path / "Qwen3-tiny-Base"
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(GENERATION))
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 151643
    return out


def _config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def test_export_of_a_base_checkpoint_keeps_its_token_ids(base_dir: Path, tmp_path: Path):
    model = from_pretrained(base_dir)
    out = save_pretrained(model, tmp_path / "export", tokenizer_dir=bundled_tokenizer_dir(), base_dir=base_dir)
    config = _config(out)
    assert {k: config[k] for k in BASE_IDS} == BASE_IDS
    assert config["pad_token_id"] == _config(base_dir)["pad_token_id"]  # null, as transformers wrote the base
    assert json.loads((out / "generation_config.json").read_text()) == GENERATION  # the base's, not the tokenizer dir's
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf.config.eos_token_id == 151643 and hf.generation_config.eos_token_id == 151643
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        for param in model.parameters():  # the export holds bf16 weights
            param.copy_(param.bfloat16().float())
        assert (hf(input_ids=ids).logits - model(ids)).abs().max().item() <= 1e-5


def test_the_hf_checkpointer_exports_with_its_base(base_dir: Path, tmp_path: Path):
    checkpointer = FullModelHFCheckpointer(checkpoint_dir=str(base_dir))
    model = from_pretrained(base_dir)
    out = checkpointer.save(model, tmp_path / "export", tokenizer_dir=str(bundled_tokenizer_dir()))
    assert _config(out)["eos_token_id"] == 151643


def test_pad_token_id_and_a_list_of_eos_ids_are_carried_as_written(base_dir: Path, tmp_path: Path):
    config = _config(base_dir)
    config.update(eos_token_id=[151643, 151645], pad_token_id=151643)
    (base_dir / "config.json").write_text(json.dumps(config))
    out = save_pretrained(from_pretrained(base_dir), tmp_path / "export", base_dir=base_dir)
    assert _config(out)["eos_token_id"] == [151643, 151645] and _config(out)["pad_token_id"] == 151643


def test_random_initialisation_keeps_the_chat_models_ids(base_dir: Path, tmp_path: Path):
    model = build_model(from_pretrained(base_dir).args, device="cpu")
    out = save_pretrained(model, tmp_path / "export", tokenizer_dir=bundled_tokenizer_dir())
    config = _config(out)
    assert (config["bos_token_id"], config["eos_token_id"]) == (151643, 151645)
    assert AutoModelForCausalLM.from_pretrained(out).config.eos_token_id == 151645


def test_convert_finds_the_runs_base_checkpoint_in_its_meta(base_dir: Path, tmp_path: Path, caplog):
    """`mirotrain convert` exports a step checkpoint with the base named by the run's config (meta.json)."""
    from mirotrain.checkpoint.convert import base_checkpoint_dir

    def meta(checkpoint_dir):
        return {"config": {"checkpointer": {"_component_": "FullModelHFCheckpointer", "checkpoint_dir": checkpoint_dir}}}

    assert base_checkpoint_dir(meta(str(base_dir))) == str(base_dir)
    assert base_checkpoint_dir(meta(None)) is None and base_checkpoint_dir({}) is None
    assert base_checkpoint_dir(meta(str(tmp_path / "moved"))) is None
    assert "is not readable here" in caplog.text
