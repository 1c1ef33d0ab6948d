"""Qwen3 dense models: builders (``qwen3_8b_instruct``, ``*_yarn``) and the tokenizer wrapper."""

from mirotrain.models.qwen3.builders import *  # noqa: F401,F403  (builder names are the public API)
from mirotrain.models.qwen3.builders import PLAIN_BUILDERS, YARN_BUILDERS, qwen3
from mirotrain.models.qwen3.model import Qwen3Args, Qwen3Transformer


def qwen3_tokenizer_auto(*args, **kwargs):
    """See :func:`mirotrain.models.qwen3.tokenizer.qwen3_tokenizer_auto` (imported lazily)."""
    from mirotrain.models.qwen3.tokenizer import qwen3_tokenizer_auto as build

    return build(*args, **kwargs)


__all__ = ["PLAIN_BUILDERS", "YARN_BUILDERS", "Qwen3Args", "Qwen3Transformer", "qwen3", "qwen3_tokenizer_auto"]
