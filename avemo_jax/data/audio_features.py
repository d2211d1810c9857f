"""The VGGish audio front end: 16 kHz mono waveform -> log-mel patches of 96 frames x 64 bands.

Follows the AudioSet VGGish release (`vggish_params.py`, `mel_features.py`, `vggish_input.py`) and
agrees with it to ~1e-5 (`tests/test_audio_features.py`): 25 ms frames with a 10 ms hop, a periodic
Hann window, 512-point FFT magnitude, 64 HTK mel bands 125-7500 Hz (DC bin excluded),
log(mel + 0.01). Only complete frames and complete 96-frame examples are kept, as in the reference.
"""
import functools
import os
import pathlib

import numpy as np
import resampy
import soundfile as sf

__all__ = [
  "SAMPLE_RATE", "NUM_BANDS", "NUM_FRAMES", "FRAME_RATE", "LOG_OFFSET", "to_mono_16k",
  "load_audio", "log_mel_spectrogram", "waveform_to_examples", "examples_at"]

SAMPLE_RATE = 16000
STFT_WINDOW_SECONDS = 0.025
STFT_HOP_SECONDS = 0.010
NUM_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_WINDOW_SECONDS = 0.96
EXAMPLE_HOP_SECONDS = 0.96

WINDOW_SAMPLES = round(SAMPLE_RATE * STFT_WINDOW_SECONDS)  # 400
HOP_SAMPLES = round(SAMPLE_RATE * STFT_HOP_SECONDS)  # 160
FFT_LENGTH = 1 << (WINDOW_SAMPLES - 1).bit_length()  # next power of two >= 400: 512
FRAME_RATE = 1.0 / STFT_HOP_SECONDS  # log-mel frames per second: 100
NUM_FRAMES = round(EXAMPLE_WINDOW_SECONDS * FRAME_RATE)  # 96
EXAMPLE_HOP_FRAMES = round(EXAMPLE_HOP_SECONDS * FRAME_RATE)  # 96
# 96 frames from frame s span 10 s .. 10 s + 975 ms (95 hops and a 25 ms window): their centre is
# 48.75 frames (487.5 ms) after frame s starts.
WINDOW_CENTRE_FRAMES = ((NUM_FRAMES - 1) * HOP_SAMPLES + WINDOW_SAMPLES) / 2 / HOP_SAMPLES
SILENCE = np.log(np.float32(LOG_OFFSET))  # the log-mel value of digital silence
# log_mel_spectrogram's frames per block (60 s): bounds its [frames, 400] and [frames, 257]
# temporaries (~80 MB a block) however long the recording.
BLOCK_FRAMES = 6000


def to_mono_16k(waveform: np.ndarray, sample_rate: float) -> np.ndarray:
  """Returns `waveform` as float32 mono at 16 kHz, shape [N].

  Args:
    waveform: [N] mono, or 2-D multichannel as [N, C] (soundfile) or [C, N] (librosa); the smaller
      axis is taken as channels (axis 1 on a tie). Signed integer PCM is scaled to [-1, 1) by
      2**(bits - 1) (int16 / 32768, as `vggish_input` does); floats are used as they are.
    sample_rate: the rate of `waveform` in Hz; other rates are resampled as `vggish_input` does,
      by resampy's "kaiser_best" filter (soxr's "HQ", librosa's default, differs by up to 0.5 in
      the top mel band, whose edge is near its passband's).
  """
  x = np.asarray(waveform)
  if not np.isfinite(sample_rate) or sample_rate <= 0:
    raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
  if x.ndim == 0 or x.ndim > 2:
    raise ValueError(f"waveform must be 1-D [N] or 2-D [N, C] / [C, N], got shape {x.shape}")
  if x.size == 0:
    raise ValueError(f"waveform is empty (shape {x.shape})")
  if np.issubdtype(x.dtype, np.signedinteger):
    x = x.astype(np.float64) / float(-np.iinfo(x.dtype).min)
  elif not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"waveform dtype must be signed integer PCM or float, got {x.dtype}")
  elif not np.all(np.isfinite(x)):
    raise ValueError(f"waveform has {np.size(x) - np.isfinite(x).sum()} non-finite samples")
  if x.ndim == 2:
    x = x.mean(axis=0 if x.shape[0] < x.shape[1] else 1)
  x = x.astype(np.float32, copy=False)
  if sample_rate != SAMPLE_RATE:
    if x.shape[0] * SAMPLE_RATE < sample_rate:  # resampy refuses what resamples to no sample
      return np.zeros(0, np.float32)
    x = resampy.resample(x, sample_rate, SAMPLE_RATE, filter="kaiser_best")
  return np.ascontiguousarray(x, dtype=np.float32)


def load_audio(path: str | os.PathLike) -> np.ndarray:
  """Reads an audio file (or a video's sound track) as float32 mono at 16 kHz, shape [N]."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such audio file")
  try:
    data, rate = sf.read(path, dtype="float32", always_2d=False)
  except sf.LibsndfileError:  # what libsndfile cannot read (m4a, mp4, ...): FFmpeg's decoders
    from avemo_jax.data import media  # pylint: disable=import-outside-toplevel (media uses us)
    return media.load_audio(path)
  if np.size(data) == 0:
    raise ValueError(f"{path}: zero-length audio")
  try:
    return to_mono_16k(data, rate)
  except ValueError as err:
    raise ValueError(f"{path}: {err}") from err


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
  """The HTK mel scale."""
  return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)


@functools.cache
def _mel_matrix() -> np.ndarray:
  """[FFT_LENGTH // 2 + 1, NUM_BANDS] triangular HTK mel weights, as AudioSet's `mel_features`."""
  bins_mel_K = _hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, FFT_LENGTH // 2 + 1))
  edges_mel = np.linspace(_hz_to_mel(MEL_MIN_HZ), _hz_to_mel(MEL_MAX_HZ), NUM_BANDS + 2)
  lower, centre, upper = edges_mel[:-2], edges_mel[1:-1], edges_mel[2:]  # [NUM_BANDS] each
  rising_KxM = (bins_mel_K[:, None] - lower) / (centre - lower)
  falling_KxM = (upper - bins_mel_K[:, None]) / (upper - centre)
  weights_KxM = np.maximum(0.0, np.minimum(rising_KxM, falling_KxM))
  weights_KxM[0] = 0.0  # HTK leaves out the DC bin
  weights_KxM = weights_KxM.astype(np.float32)
  weights_KxM.flags.writeable = False  # shared by every caller
  return weights_KxM


@functools.cache
def _periodic_hann() -> np.ndarray:
  """[WINDOW_SAMPLES] Hann window of period WINDOW_SAMPLES (not np.hanning's N - 1)."""
  window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW_SAMPLES) / WINDOW_SAMPLES))
  window = window.astype(np.float32)
  window.flags.writeable = False
  return window


def log_mel_spectrogram(waveform_16k: np.ndarray) -> np.ndarray:
  """Returns the [T, 64] float32 log-mel spectrogram of a 16 kHz mono waveform [N].

  T = 1 + (N - 400) // 160 complete frames (0 when N < 400); the incomplete tail is dropped.
  Computed BLOCK_FRAMES frames at a time: the same frames as in one go, to float32 rounding (the
  mel product may sum in another order for another number of rows).
  """
  x_N = np.asarray(waveform_16k, np.float32)
  if x_N.ndim != 1:
    raise ValueError(f"log_mel_spectrogram wants a 1-D 16 kHz waveform, got shape {x_N.shape}")
  if x_N.shape[0] < WINDOW_SAMPLES:
    return np.zeros((0, NUM_BANDS), np.float32)
  # A view of x_N (no copy): its blocks of rows overlap in samples just as the frames do.
  frames_TxW = np.lib.stride_tricks.sliding_window_view(x_N, WINDOW_SAMPLES)[::HOP_SAMPLES]
  mel_TxF = np.empty((frames_TxW.shape[0], NUM_BANDS), np.float32)
  for start in range(0, frames_TxW.shape[0], BLOCK_FRAMES):
    block_BxW = frames_TxW[start:start + BLOCK_FRAMES]
    magnitude_BxK = np.abs(np.fft.rfft(block_BxW * _periodic_hann(), n=FFT_LENGTH, axis=-1))
    mel_TxF[start:start + BLOCK_FRAMES] = magnitude_BxK.astype(np.float32) @ _mel_matrix()
  return np.log(mel_TxF + np.float32(LOG_OFFSET), out=mel_TxF)


def waveform_to_examples(waveform: np.ndarray, sample_rate: float) -> np.ndarray:
  """VGGish input examples [num_examples, 96, 64] float32, as `vggish_input.waveform_to_examples`.

  The waveform goes through `to_mono_16k` and `log_mel_spectrogram`; the frames are cut into
  non-overlapping 96-frame (0.96 s) examples and an incomplete last example is dropped.
  """
  mel_TxF = log_mel_spectrogram(to_mono_16k(waveform, sample_rate))
  if mel_TxF.shape[0] < NUM_FRAMES:
    return np.zeros((0, NUM_FRAMES, NUM_BANDS), np.float32)
  windows_ExFxW = np.lib.stride_tricks.sliding_window_view(mel_TxF, NUM_FRAMES, axis=0)
  # sliding_window_view puts the window axis last: [E, F, 96] -> [E, 96, F].
  return np.ascontiguousarray(windows_ExFxW[::EXAMPLE_HOP_FRAMES].transpose(0, 2, 1))


def examples_at(log_mel_TxF: np.ndarray, times_s: np.ndarray) -> np.ndarray:
  """The 96-frame (0.96 s) log-mel windows centred on `times_s`, shape [len(times_s), 96, F].

  The window for time t starts at frame round(t * 100 - 48.75), which centres it within 5 ms of t
  (2.5 ms early at the middle of a 40 ms frame); frames outside the recording read as log(0.01),
  exactly what digital silence gives.
  """
  mel_TxF = np.asarray(log_mel_TxF)  # not converted to float32 whole: only the rows gathered
  t_N = np.asarray(times_s, np.float64)
  if mel_TxF.ndim != 2:
    raise ValueError(f"log_mel_TxF must be 2-D [frames, bands], got shape {mel_TxF.shape}")
  if t_N.ndim != 1 or not np.all(np.isfinite(t_N)):
    raise ValueError(f"times_s must be a 1-D array of finite seconds, got shape {t_N.shape}")
  start_N = np.rint(t_N * FRAME_RATE - WINDOW_CENTRE_FRAMES).astype(np.int64)  # like round()
  # Gathers the windows' own rows only: callers ask a long recording for a few windows at a time.
  frame_NxW = start_N[:, None] + np.arange(NUM_FRAMES)
  inside_NxW = (frame_NxW >= 0) & (frame_NxW < mel_TxF.shape[0])
  windows_NxWxF = np.full((*frame_NxW.shape, mel_TxF.shape[1]), SILENCE, np.float32)
  windows_NxWxF[inside_NxW] = mel_TxF[frame_NxW[inside_NxW]]
  return windows_NxWxF
