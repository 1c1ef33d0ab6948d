import pytest

from mirotrain.models.qwen3.tokenizer import bundled_tokenizer_dir, qwen3_tokenizer_auto


@pytest.fixture(scope="session")
def tok_dir():
    return str(bundled_tokenizer_dir())


@pytest.fixture(scope="session")
def tok(tok_dir):
    return qwen3_tokenizer_auto(tok_dir)


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    """The reference: the real Qwen3 tokenizer through plain transformers."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


