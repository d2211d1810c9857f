"""Audio encoder: VGGish regressing clip-level valence/arousal from synthetic voice clips.

  python -m avemo_jax.main --config=configs/audio.py[:tiny]
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = common.base_config(common.is_tiny(arg))
  config.stages = ("audio",)
  config.lock()
  return config
