"""Audio-visual fusion (README, *Fusion*): per 40 ms frame, the frozen student's face feature and
the frozen audio encoder's embedding feed a GRU that predicts valence and arousal (loss 1 - CCC).
Audio-only, visual-only and fused models are trained and reported side by side.

Earlier stages run first unless given: teacher -> student (as configs/distill.py) and the audio
encoder (as configs/audio.py); --config.student_checkpoint / --config.audio_checkpoint reuse them.

  python -m avemo_jax.main --config=configs/fusion.py[:tiny]
"""
import ml_collections

from configs import distill


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = distill.get_config(arg)
  config.unlock()
  config.stages = ("teacher", "student", "audio", "fusion")
  config.lock()
  return config
