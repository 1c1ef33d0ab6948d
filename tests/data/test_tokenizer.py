"""Qwen3TokenizerAuto: the bundled Qwen3 tokenizer, its attributes, encoding and its section's options."""

import pytest
from data_helpers import IM_END

from mirotrain.data.datasets import shift_labels
from mirotrain.data.render import ChatRenderer
from mirotrain.models.qwen3.tokenizer import qwen3_tokenizer_auto


def test_attributes_and_encoding(tok):
    assert tok.eos_id == IM_END and tok.pad_id == 151643 and tok.vocab_size == 151669
    assert tok.decode(tok.encode("hello world")) == "hello world"
    ids, offsets = tok.encode_with_offsets("a<|im_end|>b")
    assert IM_END in ids and len(offsets) == len(ids)
    (text_ids, _), = tok.encode_text_batch(["a<|im_end|>b"])
    assert IM_END not in text_ids  # control-token strings stay text unless allow_special_tokens


def test_options_are_checked(tok_dir):
    for key, value in (("truncation_type", "middle"), ("on_overlong", "skip"), ("masking_strategy", "user")):
        with pytest.raises(ValueError, match=key):
            qwen3_tokenizer_auto(tok_dir, **{key: value})
    with pytest.raises(ValueError, match="max_seq_len must be >= 2"):
        qwen3_tokenizer_auto(tok_dir, max_seq_len=1)
    with pytest.raises(TypeError, match="unsupported argument prompt_template"):
        qwen3_tokenizer_auto(tok_dir, prompt_template="chatml")
    assert qwen3_tokenizer_auto(tok_dir, prompt_template=None).max_seq_len is None


def test_options_key_the_fingerprint(tok, tok_dir):
    assert qwen3_tokenizer_auto(tok_dir).fingerprint() == tok.fingerprint()
    assert qwen3_tokenizer_auto(tok_dir, max_seq_len=64).fingerprint() != tok.fingerprint()


def test_shifted_labels_follow_the_mask(tok):
    ids, mask = ChatRenderer(tok)([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    labels = shift_labels(ids, mask).tolist()
    assert len(labels) == len(ids) and labels[-1] == -100
    for t in range(len(ids) - 1):
        assert labels[t] == (ids[t + 1] if mask[t + 1] else -100)
