"""Model builders with the names MiroTrain configs use (``mirotrain.models.qwen3.qwen3_8b_instruct``).

Sizes mirror the public Hugging Face configs (Qwen/Qwen3-{0.6B,1.7B,4B,8B,14B,32B}[-Base]/config.json).
Base and instruct differ only in ``max_position_embeddings`` (32768 vs 40960). Every builder accepts
keyword overrides of :class:`Qwen3Args` fields (e.g. ``n_layers`` for a scaled-down test model or
``attention_backend``), and is called on whatever device is current (use ``torch.device("meta")``).
"""

from __future__ import annotations

from typing import Any

from mirotrain.models.qwen3.model import Qwen3Args, Qwen3Transformer

# dim, n_layers, n_heads, n_kv_heads, hidden_dim, tied
SIZES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "0_6b": (1024, 28, 16, 8, 3072, True),
    "1_7b": (2048, 28, 16, 8, 6144, True),
    "4b": (2560, 36, 32, 8, 9728, True),
    "8b": (4096, 36, 32, 8, 12288, False),
    "14b": (5120, 40, 40, 8, 17408, False),
    "32b": (5120, 64, 64, 8, 25600, False),
}
BASE_MAX_POSITIONS = 32768
INSTRUCT_MAX_POSITIONS = 40960


def qwen3_args(size: str, max_seq_len: int, **overrides: Any) -> Qwen3Args:
    dim, n_layers, n_heads, n_kv_heads, hidden_dim, tied = SIZES[size]
    fields = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim,
                  tie_word_embeddings=tied, max_seq_len=max_seq_len)
    fields.update(overrides)
    return Qwen3Args(**fields)


def qwen3(**args: Any) -> Qwen3Transformer:
    """A Qwen3 of any shape, from :class:`Qwen3Args` fields (used for tiny CPU models)."""
    return Qwen3Transformer(Qwen3Args(**args))


def _plain_builder(size: str, max_seq_len: int, name: str):
    def build(**overrides: Any) -> Qwen3Transformer:
        return Qwen3Transformer(qwen3_args(size, max_seq_len, **overrides))

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"Qwen3-{size.replace('_', '.').upper()} ({'base' if max_seq_len == BASE_MAX_POSITIONS else 'instruct'})."
    return build


def _yarn_builder(size: str, name: str):
    def build(max_position_embeddings: int, rope_scaling: dict[str, Any], **overrides: Any) -> Qwen3Transformer:
        """YaRN-extended context: ``max_position_embeddings`` must equal original × factor."""
        return Qwen3Transformer(qwen3_args(size, max_position_embeddings, rope_scaling=dict(rope_scaling), **overrides))

    build.__name__ = build.__qualname__ = name
    return build


qwen3_0_6b_base = _plain_builder("0_6b", BASE_MAX_POSITIONS, "qwen3_0_6b_base")
qwen3_0_6b_instruct = _plain_builder("0_6b", INSTRUCT_MAX_POSITIONS, "qwen3_0_6b_instruct")
qwen3_1_7b_base = _plain_builder("1_7b", BASE_MAX_POSITIONS, "qwen3_1_7b_base")
qwen3_1_7b_instruct = _plain_builder("1_7b", INSTRUCT_MAX_POSITIONS, "qwen3_1_7b_instruct")
qwen3_4b_base = _plain_builder("4b", BASE_MAX_POSITIONS, "qwen3_4b_base")
qwen3_4b_instruct = _plain_builder("4b", INSTRUCT_MAX_POSITIONS, "qwen3_4b_instruct")
qwen3_8b_base = _plain_builder("8b", BASE_MAX_POSITIONS, "qwen3_8b_base")
qwen3_8b_instruct = _plain_builder("8b", INSTRUCT_MAX_POSITIONS, "qwen3_8b_instruct")
qwen3_14b_base = _plain_builder("14b", BASE_MAX_POSITIONS, "qwen3_14b_base")
qwen3_14b_instruct = _plain_builder("14b", INSTRUCT_MAX_POSITIONS, "qwen3_14b_instruct")
qwen3_32b = _plain_builder("32b", INSTRUCT_MAX_POSITIONS, "qwen3_32b")

qwen3_0_6b_base_yarn = _yarn_builder("0_6b", "qwen3_0_6b_base_yarn")
qwen3_0_6b_instruct_yarn = _yarn_builder("0_6b", "qwen3_0_6b_instruct_yarn")
qwen3_1_7b_base_yarn = _yarn_builder("1_7b", "qwen3_1_7b_base_yarn")
qwen3_1_7b_instruct_yarn = _yarn_builder("1_7b", "qwen3_1_7b_instruct_yarn")
qwen3_4b_base_yarn = _yarn_builder("4b", "qwen3_4b_base_yarn")
qwen3_4b_instruct_yarn = _yarn_builder("4b", "qwen3_4b_instruct_yarn")
qwen3_8b_base_yarn = _yarn_builder("8b", "qwen3_8b_base_yarn")
qwen3_8b_instruct_yarn = _yarn_builder("8b", "qwen3_8b_instruct_yarn")
qwen3_14b_base_yarn = _yarn_builder("14b", "qwen3_14b_base_yarn")
qwen3_14b_instruct_yarn = _yarn_builder("14b", "qwen3_14b_instruct_yarn")
qwen3_32b_yarn = _yarn_builder("32b", "qwen3_32b_yarn")

PLAIN_BUILDERS = {name: obj for name, obj in globals().items() if name.startswith("qwen3_") and callable(obj)
                  and not name.endswith("_yarn") and name != "qwen3_args"}
YARN_BUILDERS = {name: obj for name, obj in globals().items() if name.endswith("_yarn")}
