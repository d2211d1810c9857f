"""Teacher: FEC triplet loss + w * AffectNet cross entropy on a shared trunk (paper §3.1).

The paper's w = 0.1 assumes a pretrained trunk: --config.teacher.loss.ce=0.1 (default 1.0).

  python -m avemo_jax.main --config=configs/teacher.py[:tiny]
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = common.base_config(common.is_tiny(arg))
  config.stages = ("teacher",)
  config.lock()
  return config
