"""Synthetic audio-visual recordings, the embedded stand-in for RECOLA (README, *Synthetic ...*).

A recording is one person over `seconds`: smooth random valence/arousal at 25 Hz (the gold
standard), a face rendered per 40 ms frame by the face renderer, and a 16 kHz voice-like signal.
As in real affect data, the two modalities see different parts of the state:

- the face shows valence fully, arousal only in part: its expression follows (v, s a + (1-s) d)
  with d the person's own smooth expressiveness, unrelated to the rated annotation, at 1.6 times
  the intensity of the circumplex inverse (clipped to the renderable range): these people are
  expressive, so that the face network's features (trained on pronounced faces) separate them;
- the voice's pitch (+-0.6 octave), loudness (+-10 dB) and syllable rate (2-6.5 per second)
  follow a mix of a and the speaker's own d', and valence shows only, and weakly, in its spectral
  brightness (0.4 v + 0.6 d'': a linear read-out of the voice's spectrum recovers valence far less
  well than arousal);
- the person speaks in turns and listens in between (silence: only the room's noise), and now
  and then hides the face (a hand in front of it), each at random times of its own.

Audio is thus better for arousal and the face for valence, but each modality is missing for
stretches of time, independently of the other: only a fused model can fill one's gaps with the
other, as on real recordings (README, *Results*: in the mean over fusion seeds it beats either
on both dimensions, not in every run).

Everything is a pure function of (seed, split, recording index); clips for the audio stage come
from the same voice with a constant (valence, arousal) per clip.
"""
import dataclasses
import functools

import numpy as np
from scipy import ndimage

from avemo_jax.data import synthetic

VERSION = 3  # of the generator: part of feature-cache keys, bumped when its output changes
FPS = 25  # label and video frames per second (RECOLA: 40 ms)
SAMPLE_RATE = 16_000
_SPLITS = {"train": 0, "dev": 1, "clips": 2}
_CONTROL_RATE = 200  # Hz: voice parameters are computed at this rate, then interpolated
_FACE_GAIN = 1.6  # expression intensity relative to `expression_for_valence_arousal`
# Share of the rated dimension in each cue; the rest is the person's own smooth variation.
_FACE_AROUSAL, _VOICE_AROUSAL, _VOICE_VALENCE = 0.8, 0.85, 0.4
# Uniform ranges (seconds) of speaking / listening turns and of visible / hidden face stretches.
_SPEAK_S, _LISTEN_S = (1.5, 5.0), (0.8, 2.5)
_VISIBLE_S, _HIDDEN_S = (2.0, 6.0), (0.8, 2.5)


def smooth_trajectory(rng: np.random.Generator, num_frames: int, *, smooth_s: float = 1.0,
                      scale: float = 0.45) -> np.ndarray:
  """float32 [T]: Gaussian-smoothed noise with standard deviation ~`scale`, within [-1, 1].

  A 1 s kernel: faster than RECOLA's annotations, so that a few minutes of synthetic recordings
  hold enough independent values to learn a fusion model that generalises across people.
  """
  pad = int(4 * smooth_s * FPS)
  x = ndimage.gaussian_filter1d(rng.standard_normal(num_frames + 2 * pad), smooth_s * FPS)
  x = x[pad:pad + num_frames]
  return np.clip(scale * x / (x.std() + 1e-8), -1.0, 1.0).astype(np.float32)


def turns(rng: np.random.Generator, num_frames: int, on_s: tuple[float, float],
          off_s: tuple[float, float]) -> np.ndarray:
  """bool [T]: alternating on/off stretches of uniform random length, entered at a random
  point of a random stretch (so that a recording may start in either state)."""
  out = np.empty(num_frames, bool)
  state, t, first = bool(rng.random() < np.mean(on_s) / (np.mean(on_s) + np.mean(off_s))), 0, True
  while t < num_frames:
    n = max(1, int(round(rng.uniform(*(on_s if state else off_s)) * FPS * (
        rng.random() if first else 1.0))))
    out[t:t + n], t, state, first = state, t + n, not state, False
  return out


@dataclasses.dataclass(frozen=True)
class Speaker:
  f0: float  # Hz at arousal 0
  formant_scale: float  # vocal tract length
  brightness: float  # spectral tilt offset
  noise_db: float  # background noise level relative to the voice


def random_speaker(rng: np.random.Generator) -> Speaker:
  return Speaker(f0=rng.uniform(95, 230), formant_scale=rng.uniform(0.88, 1.15),
                 brightness=rng.uniform(-0.3, 0.3), noise_db=rng.uniform(-30, -18))


_VOWELS = np.array([[730, 1090], [270, 2290], [530, 1840], [570, 840], [300, 870]], np.float32)


def voice(rng: np.random.Generator, speaker: Speaker, arousal_C: np.ndarray,
          brightness_C: np.ndarray, speaking_C: np.ndarray | None = None) -> np.ndarray:
  """float32 16 kHz waveform for control tracks at `_CONTROL_RATE` Hz (values in [-1, 1]);
  `speaking_C` in [0, 1] gates the voice (default: speaking throughout)."""
  n_ctl = len(arousal_C)
  n = n_ctl * SAMPLE_RATE // _CONTROL_RATE
  t_ctl = np.arange(n_ctl) / _CONTROL_RATE
  # Syllables: rate follows arousal; each syllable picks a vowel; some syllables are pauses.
  rate = 4.25 + 2.25 * arousal_C
  syl_phase = np.cumsum(rate) / _CONTROL_RATE
  syl = np.floor(syl_phase).astype(np.int64)
  n_syl = syl[-1] + 1
  vowel = rng.integers(len(_VOWELS), size=n_syl)
  voiced = rng.random(n_syl) > 0.15
  envelope = np.sin(np.pi * (syl_phase - syl)) ** 2 * voiced[syl]
  if speaking_C is not None:
    envelope = envelope * speaking_C
  loud = 10 ** ((10 * arousal_C + rng.normal(0, 1.5, n_syl)[syl]) / 20)
  prosody = 0.08 * np.sin(2 * np.pi * (syl_phase / 3 + rng.random()))
  f0_ctl = speaker.f0 * 2 ** (0.6 * arousal_C + prosody)
  formants = _VOWELS[vowel[syl]] * speaker.formant_scale  # [C, 2]
  tilt = 1.2 - 0.6 * (brightness_C + speaker.brightness)  # lower tilt: brighter voice
  # Harmonic source shaped by two formant resonances, amplitudes computed at the control rate
  # and interpolated linearly; sin(k phase) by the Chebyshev recurrence (no sin per harmonic).
  t = np.arange(n) / SAMPLE_RATE
  f0 = np.interp(t, t_ctl, f0_ctl)
  phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
  pos = np.clip(t * _CONTROL_RATE, 0, n_ctl - 1)
  i0 = pos.astype(np.int64)
  i1, w = np.minimum(i0 + 1, n_ctl - 1), pos - i0
  out = np.zeros(n, np.float64)
  sin_prev, sin_k, two_cos = np.zeros(n), np.sin(phase), 2 * np.cos(phase)
  for k in range(1, int(7000 / f0_ctl.min()) + 1):
    freq = k * f0_ctl
    amp = k ** -tilt * (np.exp(-((freq - formants[:, 0]) / 130) ** 2)
                        + 0.7 * np.exp(-((freq - formants[:, 1]) / 180) ** 2) + 0.05)
    amp = np.where(freq < 7000, amp * envelope * loud, 0.0)
    out += (amp[i0] * (1 - w) + amp[i1] * w) * sin_k
    sin_prev, sin_k = sin_k, two_cos * sin_k - sin_prev
  out *= 0.05 / (np.sqrt(np.mean(np.square(out))) + 1e-8)
  out += 0.05 * 10 ** (speaker.noise_db / 20) * rng.standard_normal(n)
  return np.clip(out, -1.0, 1.0).astype(np.float32)


def _to_control(track_T: np.ndarray) -> np.ndarray:
  """25 Hz track -> `_CONTROL_RATE` Hz, linear interpolation at frame centres (a 40 ms ramp
  between the states of a boolean track)."""
  t = (np.arange(len(track_T) * _CONTROL_RATE // FPS) + 0.5) / _CONTROL_RATE
  return np.interp(t, (np.arange(len(track_T)) + 0.5) / FPS, track_T.astype(np.float64))


def _hide(image: np.ndarray, skin, rng: np.random.Generator) -> np.ndarray:
  """A hand (a shaded skin-coloured ellipse) in front of most of the face, placed at random."""
  size = image.shape[0]
  grid = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
  x, y = grid[None, :] - rng.uniform(-0.15, 0.15), grid[:, None] - rng.uniform(-0.05, 0.25)
  a = rng.uniform(-0.5, 0.5)
  u, v = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y
  dist = np.sqrt((u / rng.uniform(0.55, 0.7)) ** 2 + (v / rng.uniform(0.6, 0.75)) ** 2)
  alpha = np.clip((1.0 - dist) * size / 4, 0.0, 1.0)[:, :, None]
  hand = 255.0 * np.asarray(skin, np.float32) * rng.uniform(0.75, 1.0) * (1.0 - 0.25 * np.clip(
      v, -1, 1))[:, :, None]
  return (image * (1 - alpha) + np.clip(hand, 0, 255) * alpha + 0.5).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Recording:
  labels: np.ndarray  # float32 [T, 2]: valence, arousal per 40 ms frame
  face_va: np.ndarray  # float32 [T, 2]: what the face shows
  speaking: np.ndarray  # bool [T]: the voice is heard (else silence)
  visible: np.ndarray  # bool [T]: the face is seen (else hidden behind a hand)
  identity: synthetic.Identity
  audio: np.ndarray  # float32 [T * 640] at 16 kHz


class SyntheticRecordings:
  """Random access to recordings of one split; `frame(i, t)` renders frame t of recording i."""

  def __init__(self, num_recordings: int, *, seed: int, split: str, seconds: float, size: int):
    if split not in ("train", "dev"):
      raise ValueError(f"split={split!r}: expected 'train' or 'dev'")
    self.num_recordings, self.seed, self.split, self.size = num_recordings, seed, split, size
    self.num_frames = int(round(seconds * FPS))
    self.names = [f"{split}_{i + 1}" for i in range(num_recordings)]  # as RECOLA's files

  def __len__(self) -> int:
    return self.num_recordings

  def _rng(self, index: int, *more: int) -> np.random.Generator:
    if not 0 <= index < self.num_recordings:
      raise IndexError(f"recording {index} out of range for {self.num_recordings}")
    return np.random.default_rng([self.seed, 7, _SPLITS[self.split], index, *more])

  @functools.lru_cache(maxsize=4)
  def __getitem__(self, index: int) -> Recording:
    rng = self._rng(index)
    t = self.num_frames
    valence, arousal = smooth_trajectory(rng, t), smooth_trajectory(rng, t)
    mix = lambda share, rated: share * rated + (1 - share) * smooth_trajectory(rng, t)
    face_arousal = mix(_FACE_AROUSAL, arousal)
    voice_arousal, brightness = mix(_VOICE_AROUSAL, arousal), mix(_VOICE_VALENCE, valence)
    identity = synthetic.random_identity(rng)
    gaps = self._rng(index, 2)
    speaking, visible = turns(gaps, t, _SPEAK_S, _LISTEN_S), turns(gaps, t, _VISIBLE_S, _HIDDEN_S)
    audio = voice(rng, random_speaker(rng), _to_control(voice_arousal), _to_control(brightness),
                  _to_control(speaking))
    return Recording(labels=np.stack([valence, arousal], 1),
                     face_va=np.stack([valence, face_arousal], 1), speaking=speaking,
                     visible=visible, identity=identity, audio=audio)

  def frame(self, index: int, t: int) -> np.ndarray:
    """uint8 [size, size, 3]: the face of frame t (pose, lighting and noise drawn per frame)."""
    rec = self[index]
    v, a = rec.face_va[t]
    expression = _FACE_GAIN * synthetic.expression_for_valence_arousal(float(v), float(a))
    rng = self._rng(index, 1, t)
    image = synthetic.render_face(expression, rec.identity, rng, self.size)
    return image if rec.visible[t] else _hide(image, rec.identity.skin, rng)


class SyntheticClips:
  """Audio-stage clips: `seconds` (one 0.96 s log-mel example) of a random speaker's voice at a
  constant (valence, arousal), mixed with the speaker's own variation as in recordings."""

  def __init__(self, num_clips: int, *, seed: int, seconds: float = 1.0):
    self.num_clips, self.seed = num_clips, seed
    self.num_ctl = int(round(seconds * _CONTROL_RATE))

  def __len__(self) -> int:
    return self.num_clips

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.num_clips:
      raise IndexError(f"clip {index} out of range for {self.num_clips}")
    rng = np.random.default_rng([self.seed, 7, _SPLITS["clips"], int(index)])
    va = rng.uniform(-0.9, 0.9, 2).astype(np.float32)
    own = rng.uniform(-0.9, 0.9, 2)
    drive = lambda share, rated, d: np.full(self.num_ctl, share * rated + (1 - share) * d)
    audio = voice(rng, random_speaker(rng), drive(_VOICE_AROUSAL, va[1], own[1]),
                  drive(_VOICE_VALENCE, va[0], own[0]))
    return {"audio": audio, "labels": va}
