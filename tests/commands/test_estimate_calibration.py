"""validate's estimate against the six peaks measured on 2× H200 (issue #18): each within ±10%.

The measured figures are data: the largest rank's peak allocated GiB of each case in docs/benchmarks.md,
section "`mirotrain validate`'s memory estimate against measured peaks" (benchmarks/memory_calibration.py on
tree 74e3bcd, torch 2.11.0+cu130). The configs are built by that script's own ``load_case`` from its own
``calibration_cases``, so a case changed there is a case changed here; the estimate is arithmetic on the
meta-device model, so no GPU is needed.
"""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.memory_calibration import calibration_cases, estimate, load_case  # noqa: E402
from mirotrain.commands.estimate import GIB  # noqa: E402

# case name -> measured peak allocated GiB (docs/benchmarks.md, the calibration table's "peak allocated")
MEASURED_ALLOC_GIB = {
    "sft_8b_16k": 66.89,          # 8B SFT, 16K, fp32 master
    "sft_8b_16k_bf16": 46.63,     # 8B SFT, 16K, master_weights=bf16
    "dpo_8b_16k": 66.89,          # 8B DPO, 16K rows, fp32 master
    "sft_8b_40k": 72.15,          # 8B SFT, 40K, fp32 master
    "sft_14b_40k_sp2": 124.07,    # 14B SFT, 40K, SP=2, fp32 master
    "sft_8b_16k_offload": 16.11,  # 8B SFT, 16K, fsdp_cpu_offload=True
}
TOLERANCE = 0.10


@pytest.mark.parametrize("name", sorted(MEASURED_ALLOC_GIB))
def test_estimate_is_within_ten_percent_of_the_measured_peak(name, tmp_path):
    case = calibration_cases("master_weights=bf16")[name]
    _, cfg = load_case(case, tmp_path / "run", None)
    mem, _ = estimate(cfg, case.world_size)
    measured = MEASURED_ALLOC_GIB[name]
    error = (mem.total / GIB - measured) / measured
    assert abs(error) <= TOLERANCE, (f"{name}: estimate {mem.total / GIB:.1f} GiB at the {mem.phase}, measured "
                                     f"{measured} GiB allocated: {error:+.1%} ({mem.gib()})")
