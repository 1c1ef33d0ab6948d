"""One training run of tests/gpu/test_deterministic_gpu.py, on every rank under torchrun: the SFT trainer on a JSON
config, then, when a second file is named, rank 0 writes the SHA-256 of every parameter's full tensor there
(the fp32 master weights; the HF export holds only their bf16 copies).

    torchrun --standalone --nproc_per_node 2 tests/gpu/deterministic_worker.py CONFIG.json [DIGESTS.json]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def weight_digests(model: nn.Module) -> dict[str, str]:
    """Each parameter's SHA-256 over the bytes of its full tensor (every rank calls it: gathering is collective)."""
    digests = {}
    for name, param in model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        data = full.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def main(config: str, digests_path: str | None) -> None:
    from mirotrain.training.distributed import destroy_distributed
    from mirotrain.training.sft import SFTTrainer

    trainer = SFTTrainer(json.loads(Path(config).read_text()))
    trainer.train()
    if digests_path is not None:
        digests = weight_digests(trainer.model)
        if dist.get_rank() == 0:
            Path(digests_path).write_text(json.dumps(digests, indent=1))
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
