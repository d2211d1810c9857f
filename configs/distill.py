"""Self-distillation: teacher (trained first unless --config.teacher_checkpoint) -> student.

The student (same architecture) learns from the frozen teacher's soft predictions on labelled,
triplet and unlabelled faces plus the ground truth:
  L = kl * T^2 KL(teacher_T || student_T) + embed * |e_s - e_t|^2 + ce * CE + triplet * L_triplet
(weights in config.student.loss; see configs/common.py for the CE weight).

  python -m avemo_jax.main --config=configs/distill.py[:tiny]
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  tiny = common.is_tiny(arg)
  config = common.base_config(tiny)
  config.stages = ("teacher", "student")
  config.student.batch_faces = 8  # + 4 triplets (12 faces) + 8 unlabelled: 28 faces a step
  config.student.batch_unlabelled = 8
  config.student.loss = ml_collections.ConfigDict(
      {"kl": 1.0, "embed": 1.0, "ce": 1.0, "triplet": 1.0})
  config.lock()
  return config
