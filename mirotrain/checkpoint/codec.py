"""Small non-tensor state (LR scheduler, dataloader position, RNG, counters) as uint8 tensors of JSON.

DCP would otherwise pickle such values and unpickle them on load; JSON in a tensor keeps checkpoints free of
pickled objects and lets each rank store its own entry under its own key. The encoding round-trips what
state dicts contain: dicts (any hashable JSON-able keys), lists, tuples, numbers (floats exactly), strings,
None, tensors and numpy arrays (small ones: stored element by element).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch


def _pack(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        return {"__tensor__": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "data": t.reshape(-1).tolist()}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": str(obj.dtype), "shape": list(obj.shape), "data": obj.reshape(-1).tolist()}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _pack(v) for k, v in obj.items()}
        return {"__items__": [[_pack(k), _pack(v)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (JSON-able state, tensors, arrays only)")


def _unpack(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_unpack(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        dtype = getattr(torch, obj["__tensor__"])
        return torch.tensor(obj["data"], dtype=dtype).reshape(obj["shape"])
    if "__ndarray__" in obj:
        return np.asarray(obj["data"], dtype=obj["__ndarray__"]).reshape(obj["shape"])
    if "__tuple__" in obj:
        return tuple(_unpack(v) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(_unpack(k)): _unpack(v) for k, v in obj["__items__"]}
    return {k: _unpack(v) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def encode(obj: Any) -> torch.Tensor:
    """``obj`` as a 1-D uint8 tensor (UTF-8 JSON)."""
    data = json.dumps(_pack(obj), separators=(",", ":"), allow_nan=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode(tensor: torch.Tensor) -> Any:
    """Inverse of :func:`encode`."""
    return _unpack(json.loads(bytes(tensor.cpu().numpy().tobytes()).decode()))
