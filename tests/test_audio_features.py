"""The VGGish front end against the AudioSet reference (`mel_features.py`, `vggish_params.py`).

The reference files come from the torchvggish sdist: run `python tools/fetch_reference.py` once.
"""
import importlib.util
import pathlib
import types

import numpy as np
import pytest
import soundfile as sf

from avemo_jax.data import audio_features as af

REF_DIR = pathlib.Path(__file__).resolve().parent / "reference"
SPEECH = REF_DIR / "arctic_a0007.wav"
TOLERANCE = 1e-3  # the project's target for the VGGish front end; the measured difference is ~1e-5


def _load_module(name: str) -> types.ModuleType:
  path = REF_DIR / f"{name}.py"
  if not path.is_file():
    pytest.skip(f"{path} is missing; run `python tools/fetch_reference.py`")
  spec = importlib.util.spec_from_file_location(f"_reference_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def ref() -> types.SimpleNamespace:
  return types.SimpleNamespace(mel=_load_module("mel_features"),
                               params=_load_module("vggish_params"))


def _reference_log_mel(ref: types.SimpleNamespace, wav_16k: np.ndarray) -> np.ndarray:
  p = ref.params
  return ref.mel.log_mel_spectrogram(
    wav_16k, audio_sample_rate=p.SAMPLE_RATE, log_offset=p.LOG_OFFSET,
    window_length_secs=p.STFT_WINDOW_LENGTH_SECONDS, hop_length_secs=p.STFT_HOP_LENGTH_SECONDS,
    num_mel_bins=p.NUM_MEL_BINS, lower_edge_hertz=p.MEL_MIN_HZ, upper_edge_hertz=p.MEL_MAX_HZ)


def _reference_examples(ref: types.SimpleNamespace, wav_16k: np.ndarray) -> np.ndarray:
  """`vggish_input.waveform_to_examples` for mono 16 kHz input (no resampling)."""
  p = ref.params
  frame_rate = 1.0 / p.STFT_HOP_LENGTH_SECONDS
  return ref.mel.frame(_reference_log_mel(ref, wav_16k),
                       window_length=int(round(p.EXAMPLE_WINDOW_SECONDS * frame_rate)),
                       hop_length=int(round(p.EXAMPLE_HOP_SECONDS * frame_rate)))


def _tone(kind: str, seconds: float = 4.0, rate: int = af.SAMPLE_RATE) -> np.ndarray:
  t = np.arange(int(seconds * rate)) / rate
  if kind == "sine":
    return 0.5 * np.sin(2 * np.pi * 440.0 * t)
  if kind == "chirp":  # linear 100 -> 7000 Hz
    return 0.5 * np.sin(2 * np.pi * (100.0 * t + (7000.0 - 100.0) / (2 * seconds) * t ** 2))
  return 0.1 * np.random.default_rng(0).standard_normal(t.shape)


def _assert_matches_reference(ref, ours_input: np.ndarray, ref_input: np.ndarray) -> None:
  expected = _reference_examples(ref, ref_input)
  got = af.waveform_to_examples(ours_input, af.SAMPLE_RATE)
  assert got.shape == expected.shape and got.dtype == np.float32
  assert got.shape[0] > 0
  diff = float(np.max(np.abs(got - expected)))
  assert diff < TOLERANCE, f"max abs difference to the reference {diff:.3g}"
  mel_TxF = af.log_mel_spectrogram(ref_input)
  mel_diff = float(np.max(np.abs(mel_TxF - _reference_log_mel(ref, ref_input))))
  assert mel_diff < TOLERANCE, f"max abs log-mel difference to the reference {mel_diff:.3g}"


def test_constants_and_mel_matrix_match_reference(ref):
  p = ref.params
  assert (af.SAMPLE_RATE, af.NUM_BANDS, af.NUM_FRAMES, af.LOG_OFFSET) == (
    p.SAMPLE_RATE, p.NUM_MEL_BINS, p.NUM_FRAMES, p.LOG_OFFSET)
  assert (af.WINDOW_SAMPLES, af.HOP_SAMPLES, af.FFT_LENGTH) == (400, 160, 512)
  expected = ref.mel.spectrogram_to_mel_matrix(
    num_mel_bins=p.NUM_MEL_BINS, num_spectrogram_bins=af.FFT_LENGTH // 2 + 1,
    audio_sample_rate=p.SAMPLE_RATE, lower_edge_hertz=p.MEL_MIN_HZ, upper_edge_hertz=p.MEL_MAX_HZ)
  np.testing.assert_allclose(af._mel_matrix(), expected, atol=1e-7)
  np.testing.assert_allclose(af._periodic_hann(), ref.mel.periodic_hann(400), atol=1e-7)


def test_real_speech_matches_reference(ref):
  if not SPEECH.is_file():
    pytest.skip(f"{SPEECH} is missing; run `python tools/fetch_reference.py`")
  wav_int16, rate = sf.read(SPEECH, dtype="int16")
  assert rate == af.SAMPLE_RATE and wav_int16.ndim == 1
  _assert_matches_reference(ref, wav_int16, wav_int16 / 32768.0)  # int16 scaling as vggish_input
  np.testing.assert_array_equal(af.load_audio(SPEECH), (wav_int16 / 32768.0).astype(np.float32))


@pytest.mark.parametrize("kind", ["sine", "chirp", "noise"])
def test_synthetic_signals_match_reference(ref, kind):
  wav = _tone(kind)
  _assert_matches_reference(ref, wav, wav)


def test_int32_pcm_scaled_like_int16():
  wav_int16 = (_tone("chirp", 1.0) * 32767).astype(np.int16)
  np.testing.assert_array_equal(af.to_mono_16k(wav_int16.astype(np.int32) << 16, af.SAMPLE_RATE),
                                af.to_mono_16k(wav_int16, af.SAMPLE_RATE))


def test_stereo_is_mean_of_channels():
  left, right = _tone("sine", 2.0), _tone("chirp", 2.0)
  mono = af.waveform_to_examples((left + right) / 2, af.SAMPLE_RATE)
  stereo_Nx2 = np.stack([left, right], axis=1)
  np.testing.assert_allclose(af.waveform_to_examples(stereo_Nx2, af.SAMPLE_RATE), mono, atol=1e-6)
  np.testing.assert_allclose(af.waveform_to_examples(stereo_Nx2.T, af.SAMPLE_RATE), mono, atol=1e-6)


def test_resampled_input_is_close_to_native_16k():
  native = af.waveform_to_examples(_tone("sine", 3.0), af.SAMPLE_RATE)
  resampled = af.waveform_to_examples(_tone("sine", 3.0, rate=44100), 44100)
  assert resampled.shape == native.shape == (3, 96, 64)
  diff = float(np.mean(np.abs(resampled - native)))
  assert diff < 0.05, f"mean abs log-mel difference after 44.1 kHz -> 16 kHz: {diff:.3g}"


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_speech_at_other_rates_matches_reference(ref, rate):
  """`vggish_input.waveform_to_examples` on stereo speech at `rate`: the mean of the channels,
  resampled by resampy (its default kaiser_best filter), then the 16 kHz front end. Our
  examples agree to 1e-3 in every band; with soxr's "HQ" (librosa's default) the top band,
  7.2-7.5 kHz, was up to 0.5 off."""
  import resampy  # the reference's resampler
  speech, native = sf.read(SPEECH, dtype="float64")
  at_rate = resampy.resample(speech, native, rate)
  stereo_Nx2 = np.stack([at_rate, 0.5 * at_rate[::-1]], axis=1)
  want = _reference_examples(ref, resampy.resample(stereo_Nx2.mean(axis=1), rate, af.SAMPLE_RATE))
  got = af.waveform_to_examples(stereo_Nx2, rate)
  assert got.shape == want.shape and got.shape[0] > 0
  diff = float(np.max(np.abs(got - want)))
  assert diff < TOLERANCE, f"{rate} Hz: max abs difference to the reference {diff:.3g}"
  assert af.to_mono_16k(np.ones(2), 44100).shape == (0,)  # too short for one 16 kHz sample


@pytest.mark.parametrize("num_samples", [0, 399, 400, 15599, 15600, 16000, 3 * 16000 + 123])
def test_shape_contract(num_samples):
  num_frames = 0 if num_samples < 400 else 1 + (num_samples - 400) // 160
  wav = _tone("noise", 4.0)[:num_samples]
  assert af.log_mel_spectrogram(wav).shape == (num_frames, 64)
  if num_samples:
    examples = af.waveform_to_examples(wav, af.SAMPLE_RATE)
    assert examples.shape == (num_frames // 96, 96, 64) and examples.dtype == np.float32


def test_silence_is_log_offset():
  mel_TxF = af.log_mel_spectrogram(np.zeros(8000, np.float32))
  assert np.all(mel_TxF == af.SILENCE) and af.SILENCE == np.log(np.float32(0.01))


@pytest.mark.parametrize("block_frames", [1, 97, 698, 699])
def test_log_mel_in_blocks_equals_one_shot(monkeypatch, block_frames):
  """7 s, 698 frames: a frame a block; 8 blocks, the last of 19 frames; one block just fitting; one
  block larger than the whole."""
  wav = np.concatenate([_tone("chirp", 4.0), _tone("noise", 3.0)])
  frames_TxW = np.lib.stride_tricks.sliding_window_view(wav.astype(np.float32), 400)[::160]
  one_shot_TxF = np.log(np.abs(np.fft.rfft(frames_TxW * af._periodic_hann(), n=512)).astype(
      np.float32) @ af._mel_matrix() + np.float32(0.01))  # the whole signal at once, as before
  monkeypatch.setattr(af, "BLOCK_FRAMES", block_frames)
  mel_TxF = af.log_mel_spectrogram(wav)
  assert mel_TxF.shape == one_shot_TxF.shape == (698, 64) and mel_TxF.dtype == np.float32
  np.testing.assert_allclose(mel_TxF, one_shot_TxF, rtol=1e-6, atol=1e-6)  # seen: 4.8e-7


def _examples_by_padding(mel_TxF: np.ndarray, times_s: np.ndarray) -> np.ndarray:
  """`examples_at` as first written: pads the whole log-mel with silence, then indexes it."""
  start_N = np.rint(times_s * 100 - 48.75).astype(np.int64)
  lo, hi = max(0, -start_N.min()), max(0, start_N.max() + 96 - len(mel_TxF))
  padded_TxF = np.pad(mel_TxF, ((lo, hi), (0, 0)), constant_values=af.SILENCE)
  return padded_TxF[start_N[:, None] + lo + np.arange(96)]


def test_examples_at_equals_padding_the_whole_log_mel():
  mel_TxF = af.log_mel_spectrogram(_tone("chirp", 3.0))  # 298 frames
  rng = np.random.default_rng(0)
  for times_s in ([1.5], [0.0, 0.04], [2.9, 3.5], [-2.0, -1.0], [10.0], [-1.0, 5.0],
                  rng.uniform(-1, 4, 32), np.sort(rng.uniform(0, 3, 32))):
    times_s = np.asarray(times_s)
    np.testing.assert_array_equal(af.examples_at(mel_TxF, times_s),
                                  _examples_by_padding(mel_TxF, times_s))
  np.testing.assert_array_equal(  # float64 log-mels are read as float32, as before
      af.examples_at(mel_TxF.astype(np.float64), times_s), af.examples_at(mel_TxF, times_s))
  # A 10^9-frame (116 day) log-mel that takes no memory: padding it whole would need 256 GB.
  huge_TxF = np.broadcast_to(mel_TxF[100], (10 ** 9, 64))
  windows = af.examples_at(huge_TxF, np.array([0.0, 5e6, 1e7 - 0.2]))
  np.testing.assert_array_equal(windows[0, :49], af.SILENCE)
  np.testing.assert_array_equal(windows[0, 49:], huge_TxF[:47])
  np.testing.assert_array_equal(windows[1], huge_TxF[:96])
  np.testing.assert_array_equal(windows[2, :69], huge_TxF[:69])
  np.testing.assert_array_equal(windows[2, 69:], af.SILENCE)


def test_examples_at_windows_and_padding():
  mel_TxF = af.log_mel_spectrogram(_tone("chirp", 3.0))
  num_frames = mel_TxF.shape[0]  # 298
  times_s = np.array([1.0, 1.234, 2.0, 0.0, 0.2, (num_frames - 1) / 100, 100.0])
  windows = af.examples_at(mel_TxF, times_s)
  assert windows.shape == (len(times_s), 96, 64) and windows.dtype == np.float32
  for window, start in zip(windows[:3], (51, 75, 151)):  # interior: plain slices
    np.testing.assert_array_equal(window, mel_TxF[start:start + 96])
  np.testing.assert_array_equal(windows[3, :49], af.SILENCE)  # t = 0 starts 49 frames early
  np.testing.assert_array_equal(windows[3, 49:], mel_TxF[:47])
  np.testing.assert_array_equal(windows[4, :29], af.SILENCE)
  np.testing.assert_array_equal(windows[4, 29:], mel_TxF[:67])
  np.testing.assert_array_equal(windows[5, :50], mel_TxF[-50:])  # last frame: 46 padded after
  np.testing.assert_array_equal(windows[5, 50:], af.SILENCE)
  np.testing.assert_array_equal(windows[6], af.SILENCE)
  label_times_s = np.arange(0, 3.0, 0.04)  # 25 Hz label frames
  assert af.examples_at(mel_TxF, label_times_s).shape == (75, 96, 64)
  # Centred: 96 frames from frame s span 10 s .. 10 s + 975 ms (frame k: 10 k .. 10 k + 25 ms).
  index_TxF = np.broadcast_to(np.arange(10000, dtype=np.float32)[:, None], (10000, 64))
  times_s = np.random.default_rng(1).uniform(1, 90, 200)
  centre_ms = af.examples_at(index_TxF, times_s)[:, 0, 0] * 10 + 975 / 2
  assert np.abs(centre_ms - 1000 * times_s).max() <= 5
  middles_s = (np.arange(13, 113) + 0.5) / 25  # of 40 ms label frames (inside): 2.5 ms early
  centre_ms = af.examples_at(index_TxF, middles_s)[:, 0, 0] * 10 + 975 / 2
  np.testing.assert_allclose(centre_ms - 1000 * middles_s, -2.5, atol=1e-6)
  assert af.examples_at(mel_TxF, np.zeros(0)).shape == (0, 96, 64)


@pytest.mark.parametrize("waveform, rate, problem", [
  (np.zeros(0), 16000, "empty"),
  (np.zeros((2, 0)), 16000, "empty"),
  (np.array([0.0, np.nan, 0.1]), 16000, "non-finite"),
  (np.array([0.0, np.inf]), 16000, "non-finite"),
  (np.zeros((2, 3, 4)), 16000, "1-D"),
  (np.zeros(100), 0, "sample_rate"),
  (np.zeros(100), -8000, "sample_rate"),
  (np.zeros(100, bool), 16000, "dtype"),
])
def test_bad_input_raises(waveform, rate, problem):
  with pytest.raises(ValueError, match=problem):
    af.waveform_to_examples(waveform, rate)


def test_examples_at_bad_input_raises():
  with pytest.raises(ValueError, match="2-D"):
    af.examples_at(np.zeros(10), np.zeros(1))
  with pytest.raises(ValueError, match="finite"):
    af.examples_at(np.zeros((10, 64)), np.array([np.nan]))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                            "ignore::DeprecationWarning")  # librosa's audioread fallback
def test_load_audio_errors_name_the_file(tmp_path):
  missing = tmp_path / "missing.wav"
  with pytest.raises(FileNotFoundError, match="missing.wav"):
    af.load_audio(missing)
  garbage = tmp_path / "garbage.wav"
  garbage.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(ValueError, match="garbage.wav.*re-download"):
    af.load_audio(garbage)
  empty = tmp_path / "empty.wav"
  sf.write(empty, np.zeros(0, np.float32), 16000)
  with pytest.raises(ValueError, match="empty.wav: zero-length"):
    af.load_audio(empty)


def test_load_audio_stereo_44k(tmp_path):
  path = tmp_path / "stereo.flac"
  left, right = _tone("sine", 2.0, rate=44100), _tone("chirp", 2.0, rate=44100)
  sf.write(path, np.stack([left, right], axis=1), 44100)
  wav = af.load_audio(path)
  assert wav.dtype == np.float32 and wav.shape == (32000,)
