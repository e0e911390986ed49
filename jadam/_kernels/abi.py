"""The one table of what Python and the C++ kernels agree on: scalar layouts, mode bits, hash constants.

`fused.py` and `sparse_step.py` build their calls from these names; the C++
(`csrc/adam_cpu.cc`, `csrc/sparse_adam_cpu.cc`) declares the same layout in its
enums, and `tests/kernels/test_abi.py` parses the C++ and checks it against this table
(order, values and the hash's constants), so the two cannot drift apart.
"""

from __future__ import annotations

from jadam._storage import bf16 as _bf16

# enum Scalar in adam_cpu.cc: the dense kernel's scalars, in this order (C++ name, Python name).
SCALARS = (
  ("kOneMinusB1", "OMB1"),
  ("kB1", "B1"),
  ("kOneMinusB2", "OMB2"),
  ("kB2", "B2"),
  ("kC1", "C1"),
  ("kC2", "C2"),
  ("kEpsRoot", "EPS_ROOT"),
  ("kEps", "EPS"),
  ("kNegLr", "NEG_LR"),
  ("kWeightDecay", "WD"),
  ("kClipNorm", "CLIP_NORM"),
  ("kClipMax", "CLIP_MAX"),
  ("kClipOn", "CLIP_ON"),
  ("kApply", "APPLY"),
  ("kDecayFactor", "FACTOR"),
  ("kSign", "SIGN"),
)
N_SCALARS = len(SCALARS)  # kNumScalars
S = {py: i for i, (_, py) in enumerate(SCALARS)}  # the dense scalars' positions by Python name

# enum Mode in adam_cpu.cc: which stages are present, a bit set (C++ name, Python name, bit).
MODES = (
  ("kCoupled", "COUPLED", 1),  # add_l2 before the moments
  ("kDecoupled", "DECOUPLED", 2),  # add_l2 after normalize
  ("kNegate", "NEGATE", 4),  # flip_sign
  ("kClip", "CLIP", 8),  # optax.clip_by_global_norm in front
  ("kAmsgrad", "AMSGRAD", 16),  # max_nu before bias_correct
  ("kTorchDecay", "TORCH_DECAY", 32),  # decoupled_decay after scale_by_lr
)
MODE = {py: bit for _, py, bit in MODES}

# enum SparseScalar in sparse_adam_cpu.cc: the row-sparse kernel's scalars, in this order.
SPARSE_SCALARS = (
  ("kOneMinusB1", "OMB1"),
  ("kOneMinusB2", "OMB2"),
  ("kScale", "SCALE"),
  ("kEpsRoot", "EPS_ROOT"),
  ("kEps", "EPS"),
  ("kNegLr", "NEG_LR"),
  ("kSign", "SIGN"),
  ("kApply", "APPLY"),
)
N_SPARSE_SCALARS = len(SPARSE_SCALARS)  # kNumSparseScalars
SPARSE = {py: i for i, (_, py) in enumerate(SPARSE_SCALARS)}

# The bfloat16 stochastic rounding's hash (jadam._storage.bf16.hash_bits), which adam_cpu.cc's HashBits and the
# bfloat16 kernel's step term repeat: the index multiplier, the step multiplier, murmur3's two fmix32 multipliers,
# and the stream multiplier (the offsets the Python side passes).
HASH = {
  "index": int(_bf16._M1),
  "step": int(_bf16._M2),
  "stream": int(_bf16._M3),
  "fmix1": int(_bf16._F1),
  "fmix2": int(_bf16._F2),
}
