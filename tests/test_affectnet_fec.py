"""AffectNet and FEC builders on fixtures in the official formats: prepare, read back through
tfds data sources and Grain, and check crops, labels, skip counts and the report."""
import collections
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageFile

import official_fixtures
from avemo_jax.data import affectnet, faces, fec, recola, spill, tfds_common, unlabelled

SIZE = 48
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def affectnet_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("affectnet")
  truth = official_fixtures.write_affectnet(root / "manual")
  report, fresh = affectnet.prepare(root / "manual", root / "data", image_size=SIZE, margin=0.0)
  assert fresh
  return root, truth, report


@pytest.fixture(scope="module")
def fec_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("fec")
  truth = official_fixtures.write_fec(root / "manual")
  report, fresh = fec.prepare(root / "manual", root / "data", image_size=SIZE, margin=0.25,
                              num_workers=2)  # the process pool path
  assert fresh
  return root, truth, report


def _resized(face: np.ndarray) -> np.ndarray:
  return np.asarray(Image.fromarray(face).resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def _mad(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(a.astype(np.float32) - b).mean())


def _crop(image: np.ndarray, box, *, margin: float, size: int) -> np.ndarray:
  """faces.crop of a corner box (x0, y0, x1, y1), as the builders call it."""
  x0, y0, x1, y1 = box
  return faces.crop(image, (x0, y0, x1 - x0, y1 - y0), margin=margin, size=size)


def test_large_jpegs_decode_at_reduced_scale(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  photo = np.asarray(Image.fromarray(rng.integers(0, 256, (25, 25, 3), dtype=np.uint8)).resize(
      (800, 600), Image.Resampling.BICUBIC))
  Image.fromarray(photo).save(tmp_path / "big.jpg", quality=95)
  box = (300, 100, 700, 500)  # 400 px: decoded at 1/4, so the face keeps 100 >= 2 * 48 px
  image, scaled = tfds_common._load(tfds_common.Job(str(tmp_path / "big.jpg"), box), SIZE, 0.0)
  assert image.shape == (150, 200, 3) and scaled == (75, 25, 175, 125)
  full = _crop(photo, box, margin=0.0, size=SIZE)
  assert _mad(_crop(image, scaled, margin=0.0, size=SIZE), full) < 2
  # Faces of one file share its decode at each scale (1/4, 1/4, full), with the same bytes.
  jobs = [tfds_common.Job(str(tmp_path / "big.jpg"), b)
          for b in (box, (310, 110, 700, 500), (10, 10, 60, 60))]
  config, decodes = tfds_common.crop_config(SIZE, 0.0), _count_decodes(monkeypatch)
  assert tfds_common.crop_each(jobs, config) == [tfds_common.crop_job(j, config) for j in jobs]
  assert decodes[jobs[0].path] == 2 + 3


def _count_decodes(monkeypatch) -> collections.Counter:
  """Counts the decodes of image files (by path) from now on."""
  decodes, load = collections.Counter(), ImageFile.ImageFile.load

  def counted(im):
    decodes[im.filename] += bool(im.tile)  # an image already decoded has no tiles left
    return load(im)
  monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
  return decodes


def test_affectnet_report_counts_every_skip(affectnet_data):
  _, truth, report = affectnet_data
  for split, name in (("train", "training.csv"), ("validation", "validation.csv")):
    rows, r = truth[name], report[split]
    expected = collections.Counter(row.expect for row in rows if row.expect != "written")
    assert r["skipped"] == dict(expected)
    written = [row for row in rows if row.expect == "written"]
    assert r["written"] == {f"{split}_7class": sum(row.label != 7 for row in written),
                            f"{split}_contempt": sum(row.label == 7 for row in written)}
    for row in rows:
      if row.expect != "written":  # every skip is quoted with its file and line
        assert any(e.startswith(f"{name} line {row.line}:") for e in r["examples"][row.expect])
  assert report["train"]["notes"] == {"kept without valence/arousal (-2 or out of range)": 2}
  text = tfds_common.format_report(report)
  assert "expression 10 (No-Face)" in text and "training.csv line 22:" in text


@pytest.mark.parametrize("num_classes", [8, 7])
def test_affectnet_read_back_through_grain(affectnet_data, num_classes):
  root, truth, _ = affectnet_data
  for split, name in (("train", "training.csv"), ("test", "validation.csv")):
    rows = {row.line: row for row in truth[name] if row.expect == "written"
            and (num_classes == 8 or row.label != 7)}
    source = affectnet.source(root / "data", split, num_classes=num_classes, image_size=SIZE,
                              margin=0.0)
    part = "train" if split == "train" else "validation"
    raw = tfds_common.data_source(
        affectnet.Affectnet, tfds_common.crop_config(SIZE, 0.0), f"{part}_7class" +
        (f"+{part}_contempt" if num_classes == 8 else ""), root / "data", "")
    assert len(source) == len(raw) == len(rows)
    ds = grain.MapDataset.source(source)
    seen, wrong = set(), []
    for i in range(len(ds)):
      ex, row = ds[i], rows[int(raw[i]["line"])]
      seen.add(row.line)
      assert ex["image"].shape == (SIZE, SIZE, 3) and ex["image"].dtype == np.uint8
      assert ex["label"] == row.label and ex["label"].dtype == np.int32
      valid = -1 <= row.valence <= 1 and -1 <= row.arousal <= 1
      assert ex["va_valid"] == valid
      np.testing.assert_allclose([ex["valence"], ex["arousal"]],
                                 [row.valence, row.arousal] if valid else [0, 0], atol=1e-6)
      assert _mad(ex["image"], _resized(row.faces[0].pixels)) < 6  # the pasted face
      other = rows[next(k for k in rows if k != row.line)]
      wrong.append(_mad(ex["image"], _resized(other.faces[0].pixels)))
    assert seen == set(rows) and min(wrong) > 12
    batch = next(iter(ds.batch(4)))
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["va_valid"].dtype == bool
    assert max(int(source[i]["label"]) for i in range(len(source))) == num_classes - 1


def test_affectnet_errors_name_the_file_and_the_fix(affectnet_data, tmp_path):
  root, _, _ = affectnet_data
  for builder in (affectnet.Affectnet, fec.Fec):  # the default variant, and any other
    for size, margin in ((140, 0.1), (64, 0.0)):
      assert not builder(config=tfds_common.crop_config(size, margin), data_dir=tmp_path,
                         file_format="array_record").is_prepared()
  with pytest.raises(FileNotFoundError, match="prepare_affectnet.py .*--image_size=64"):
    affectnet.source(root / "data", "train", image_size=64)
  lists = root / "manual" / "Manually_Annotated_file_lists"
  manual = tmp_path / "manual"
  (manual / "Manually_Annotated_Images").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="training.csv not found"):
    affectnet.find_inputs(manual)
  for name in ("training.csv", "validation.csv"):
    (manual / name).write_text((lists / name).read_text())
  with pytest.raises(FileNotFoundError, match="none of the .* first rows of .*training.csv "
                                               "exists .*--image_root"):
    affectnet.find_inputs(manual)
  with pytest.raises(FileNotFoundError, match="no image folder.*--image_root"):
    affectnet.find_inputs(manual, image_root=tmp_path / "nowhere")
  body = (lists / "validation.csv").read_text().split("\n", 1)[1]
  (manual / "validation.csv").write_text(body)  # without its header line: read from line 1
  lines = list(affectnet._rows(manual / "validation.csv"))
  assert lines[0][0] == 1 and len(lines) == len(body.splitlines())
  (manual / "training.csv").write_text("path,x,y\nsome/file.jpg,1,2\n")
  with pytest.raises(ValueError, match=r"training.csv line 1: not an AffectNet"):
    affectnet.find_inputs(manual)


def _affectnet_copy(root: pathlib.Path, manual: pathlib.Path, validation) -> None:
  """The fixture's training.csv and images (their folders linked) in `manual`, with
  validation.csv's rows mapped by `validation(fields) -> fields or None`."""
  lists = root / "manual" / "Manually_Annotated_file_lists"
  (manual / "Manually_Annotated_Images").mkdir(parents=True)
  for folder in (root / "manual" / "Manually_Annotated" / "Manually_Annotated_Images").iterdir():
    (manual / "Manually_Annotated_Images" / folder.name).symlink_to(folder)
  (manual / "training.csv").write_text((lists / "training.csv").read_text())
  header, *lines = (lists / "validation.csv").read_text().splitlines()
  rows = [validation(line.split(",")) for line in lines]
  (manual / "validation.csv").write_text(
      "\n".join([header] + [",".join(r) for r in rows if r is not None]) + "\n")


def test_affectnet_splits_that_would_be_empty(affectnet_data, tmp_path):
  """Refused before anything is written when the first rows' images are missing or no row is
  usable; an empty split after all says why; a list without Contempt gets no contempt split."""
  root, truth, _ = affectnet_data
  _affectnet_copy(root, tmp_path / "gone", lambda f: ["0/gone.jpg", *f[1:]])
  with pytest.raises(FileNotFoundError, match="first rows of .*validation.csv exists"):
    affectnet.prepare(tmp_path / "gone", tmp_path / "data", image_size=16, margin=0.0)
  _affectnet_copy(root, tmp_path / "none", lambda f: [*f[:6], "9", *f[7:]])
  with pytest.raises(ValueError, match=r"validation.csv: no usable row .*'expression 9"):
    affectnet.prepare(tmp_path / "none", tmp_path / "data", image_size=16, margin=0.0)
  _affectnet_copy(root, tmp_path / "empty", lambda f: ["new/empty.jpg", *f[1:]])
  (tmp_path / "empty" / "Manually_Annotated_Images" / "new").mkdir()
  (tmp_path / "empty" / "Manually_Annotated_Images" / "new" / "empty.jpg").write_bytes(b"")
  with pytest.raises(ValueError, match="no examples for split validation_7class.*unreadable"):
    affectnet.prepare(tmp_path / "empty", tmp_path / "data", image_size=16, margin=0.0)
  # Left behind: the crops made so far (for the next attempt), not tfds's empty folders.
  assert [p.name[:16] for p in (tmp_path / "data").iterdir()] == ["affectnet_spill_"]
  _affectnet_copy(root, tmp_path / "seven", lambda f: None if f[6] == "7" else f)
  report, _ = affectnet.prepare(tmp_path / "seven", tmp_path / "data", image_size=16, margin=0.0)
  assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["affectnet"]
  assert report["validation"]["notes"]["no Contempt rows: no contempt split"] == 1
  assert set(report["validation"]["written"]) == {"validation_7class"}
  written = [r for r in truth["validation.csv"] if r.expect == "written" and r.label != 7]
  for classes in (7, 8):
    test = affectnet.source(tmp_path / "data", "test", num_classes=classes, image_size=16,
                            margin=0.0)
    assert len(test) == len(written)
  assert any(r.label == 7 for r in truth["training.csv"] if r.expect == "written")
  train = affectnet.source(tmp_path / "data", "train", image_size=16, margin=0.0)
  assert max(int(train[i]["label"]) for i in range(len(train))) == 7


def test_affectnet_csv_forms_and_broken_csvs(tmp_path):
  """A byte-order mark, no header and a first row outside the 8 classes are read; an unclosed
  quote or bytes that are not UTF-8 are refused naming the line, when the CSV is scanned (before
  any split is written); an infinite box is a bad box."""
  row = lambda file, code, w="50": f"{file},10,10,{w},50,{';'.join(['20.0'] * 136)},{code},0,0"
  good = [row(f"1/{i}.jpg", i % 7) for i in range(300)]
  path = tmp_path / "validation.csv"
  path.write_text("\ufeff" + ",".join(affectnet.HEADER) + "\n" + "\n".join(good) + "\n")
  assert [line for line, _ in affectnet._rows(path)] == list(range(2, 302))
  path.write_text("\n".join([row("1/a.jpg", 10), *good]) + "\n")
  assert affectnet._scan(path)[1] == {"expression 10 (No-Face)": 1, "7class": 300}
  path.write_text("\n".join([good[0], '"' + good[1], *good[2:]]) + "\n")
  with pytest.raises(ValueError, match=r"validation.csv line 2: .*quote that never closes"):
    affectnet._scan(path)
  path.write_bytes(("\n".join(good[:150]) + "\n").encode() + b"1/caf\xe9.jpg" +
                   ("\n".join(good[150:]) + "\n").encode()[5:])
  with pytest.raises(ValueError, match=r"validation.csv, line \d+ or soon after: not UTF-8"):
    affectnet._scan(path)
  assert affectnet._parse(row("1/a.jpg", 1, w="inf").split(",")).reason == "bad box"


def test_fec_report_counts_skips_and_missing_images(fec_data):
  _, truth, report = fec_data
  for split, rows in truth.items():
    r = report[split]
    expected = collections.Counter(row.expect for row in rows if row.expect != "written")
    assert r["skipped"] == dict(expected)
    assert r["written"] == {split: sum(row.expect == "written" for row in rows)}
    parsed = [row for row in rows if row.expect not in ("malformed line", "bad box",
                                                        "no majority")]
    files = {face.path for row in parsed for face in row.faces}
    assert r["distinct images referenced"] == len(files)
    assert r["distinct images missing"] == sum(not p.exists() for p in files) == 1
    for row in rows:
      if row.expect != "written":
        assert any(f"-{split}-public.csv line {row.line}:" in e for e in r["examples"][row.expect])
  assert "placeholder" in " ".join(report["train"]["examples"]["unreadable image"])


def test_fec_read_back_through_grain(fec_data):
  root, truth, _ = fec_data
  for split in ("train", "test"):
    rows = {row.line: row for row in truth[split] if row.expect == "written"}
    source = fec.source(root / "data", split, image_size=SIZE, margin=0.25)
    raw = tfds_common.data_source(fec.Fec, tfds_common.crop_config(SIZE, 0.25), split,
                                  root / "data", "")
    assert len(source) == len(rows)
    ds = grain.MapDataset.source(source).map(lambda ex: ex)
    for i in range(len(ds)):
      ex, row = ds[i], rows[int(raw[i]["line"])]
      assert ex["images"].shape == (3, SIZE, SIZE, 3) and ex["images"].dtype == np.uint8
      assert (ex["label"], ex["triplet_type"]) == (row.label, row.triplet_type)
      np.testing.assert_array_equal(ex["annotations"], row.votes)
      assert ex["label"] == np.bincount(ex["annotations"], minlength=3).argmax()
      for crop, face in zip(ex["images"], row.faces):  # one face touches the photo's border
        photo = np.asarray(Image.open(face.path).convert("RGB"))
        expected = _crop(photo, face.box, margin=0.25, size=SIZE)
        assert _mad(crop, expected) < 4
        # Independently of the crop function: the face fills the middle 32 px (48 / 1.5) of the crop.
        assert _mad(crop[8:40, 8:40], np.asarray(Image.fromarray(face.pixels).resize(
            (32, 32), Image.Resampling.BICUBIC))) < 12
      annotators = raw[i]["annotators"]
      assert len(annotators) == 6 and all(a.decode().isdigit() for a in annotators)


def test_fec_crops_each_distinct_face_once(fec_data, tmp_path, monkeypatch):
  """Each distinct (file, box) of a split is cropped once and each file decoded once per split
  (faces of one file share a decode; none here needs a reduced scale), and the triplets are byte for byte
  those of cropping each row's faces (tfds_common.crop_job), with the pool (fec_data) and
  without; a failure leaves no file behind."""
  root, truth, report = fec_data
  images, config = root / "manual" / "images", tfds_common.crop_config(SIZE, 0.25)
  decodes, crops = _count_decodes(monkeypatch), collections.Counter()
  crop_job = tfds_common.crop_job

  def counted(job, *args):
    crops[job] += 1
    return crop_job(job, *args)
  monkeypatch.setattr(tfds_common, "crop_job", counted)
  assert fec.prepare(root / "manual", tmp_path / "data", image_size=SIZE, margin=0.25)[1]
  monkeypatch.undo()
  distinct, files, uses = collections.Counter(), collections.Counter(), 0
  for split in ("train", "test"):
    csv_path = root / "manual" / "FEC_dataset" / fec.CSVS[split]
    jobs = {line: fec._jobs(t, images) for line, f in tfds_common.csv_rows(csv_path)
            if isinstance(t := fec._parse(f), fec.Triplet)}  # of every row that parses
    faces = {j for row in jobs.values() for j in row}
    assert report[split]["distinct faces referenced"] == len(faces)
    distinct.update(faces)
    uses += 3 * len(jobs)
    files.update({j.path for j in faces if os.path.isfile(j.path)  # missing files and the
                  and pathlib.Path(j.path).read_bytes()[:2] == b"\xff\xd8"})  # PNG: no decode
    for data in (root / "data", tmp_path / "data"):
      raw = tfds_common.data_source(fec.Fec, config, split, data, "")
      assert len(raw) == sum(row.expect == "written" for row in truth[split])
      for i in range(len(raw)):
        per_row = [tfds_common.crop_job(j, config) for j in jobs[raw[i]["line"]]]
        assert list(raw[i]["images"]) == per_row
  assert (uses, sum(distinct.values()), sum(files.values())) == (39, 21, 12)  # of the fixture
  assert crops == distinct and decodes == files

  def broken(*args, **kwargs):
    raise RuntimeError("a worker failed")
  monkeypatch.setattr(tfds_common, "crop_each", broken)
  with pytest.raises(RuntimeError, match="a worker failed"):
    fec.prepare(root / "manual", tmp_path / "failed", image_size=SIZE, margin=0.25)
  assert not [p for p in (tmp_path / "failed").rglob("*") if p.is_file()]


def test_fec_image_folder_convention_errors(fec_data, tmp_path):
  root, _, _ = fec_data
  manual = tmp_path / "manual"
  (manual / "FEC_dataset").mkdir(parents=True)
  for split in ("train", "test"):
    name = f"faceexp-comparison-data-{split}-public.csv"
    (manual / name).write_text((root / "manual" / "FEC_dataset" / name).read_text())
  with pytest.raises(FileNotFoundError, match="no image folder .*basename of its URL"):
    fec.find_inputs(manual)
  (manual / "images").mkdir()
  (manual / "images" / "renamed.jpg").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="none of the .* basename of its URL"):
    fec.find_inputs(manual)
  urls = fec.list_urls(manual)
  assert len(urls) == len(set(urls)) == 10 and all(u.startswith("http://farm") for u in urls)
  for name in (fec.image_name(u) for u in urls):
    (manual / "images" / name).write_bytes(b"")
  test_csv = manual / "faceexp-comparison-data-test-public.csv"
  test_csv.write_text(re.sub(r"/([^/,]+\.jpg)", r"/gone_\1", test_csv.read_text()))
  with pytest.raises(FileNotFoundError, match="first rows of .*test-public.csv exists"):
    fec.find_inputs(manual)


def _tool(*args: str) -> str:
  done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_prepare_tools_print_the_report(affectnet_data, fec_data, tmp_path):
  root, _, _ = affectnet_data
  out = _tool("tools/prepare_affectnet.py", f"--manual_dir={root / 'manual'}",
              f"--data_dir={tmp_path}", "--image_size=24", "--num_workers=0")
  assert "\nPrepared:\n" in out and "training.csv line 23:" in out
  assert "written 17" in out and "unreadable image" in out
  meta = json.loads((tmp_path / "affectnet" / "24px_margin0.1" / "1.0.0" /
                     "metadata.json").read_text())
  assert meta["train"]["skipped"]["missing image"] == 1
  fec_root, _, _ = fec_data
  urls = tmp_path / "urls.txt"
  out = _tool("tools/prepare_fec.py", f"--manual_dir={fec_root / 'manual'}", f"--list_urls={urls}")
  assert "10 distinct image URLs" in out and len(urls.read_text().split()) == 10


@pytest.mark.parametrize("prepare", [affectnet.prepare, fec.prepare, unlabelled.prepare,
                                     recola.prepare], ids=lambda prepare: prepare.__module__)
def test_a_wrong_manual_dir_fails_first_and_leaves_data_dir_as_it_was(prepare, tmp_path, capsys):
  """A folder without the builder's inputs fails with one error naming --manual_dir, before tfds
  announces the preparation or makes its folders."""
  manual = tmp_path / "wrong"
  manual.mkdir()
  (manual / "notes.txt").write_text("not a data set")
  data = tmp_path / "data"  # holding another data set
  (data / "other" / "1.0.0").mkdir(parents=True)
  (data / "other" / "1.0.0" / "kept.txt").write_text("kept")
  tree = lambda: sorted(p.relative_to(data) for p in data.rglob("*"))
  before = tree()
  with pytest.raises((FileNotFoundError, ValueError), match=re.escape(f"--manual_dir={manual}")):
    prepare(manual, data, image_size=SIZE, margin=0.0)
  assert tree() == before
  assert "Downloading and preparing" not in capsys.readouterr().out


@pytest.mark.parametrize("builder", [affectnet.Affectnet, fec.Fec, recola.Recola,
                                     unlabelled.UnlabelledFaces])
def test_builders_leave_no_temporary_directory(builder, tmp_path, monkeypatch):
  """A builder whose data is not prepared yet once asked TFDS's catalog bucket for its metadata,
  which left an empty `tmp*tfds` directory in the system's temporary folder every time."""
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  made = builder(config=tfds_common.crop_config(SIZE, 0.0, 90), data_dir=tmp_path / "data")
  assert not made.is_prepared() and made.info.features is not None
  assert not list(temp.iterdir())


_CROP_JOB, _CROP_EACH = tfds_common.crop_job, tfds_common.crop_each


def _count_crops(monkeypatch, kill_after: int | None = None) -> collections.Counter:
  """Counts the faces cropped here (by job) from now on; with `kill_after`, a Ctrl-C comes when
  that many tasks (FEC: files, AffectNet: rows) have been cropped."""
  crops, tasks = collections.Counter(), []

  def crop_each(jobs, config):
    if len(tasks) == kill_after:
      raise KeyboardInterrupt  # as the user's Ctrl-C
    tasks.append(jobs)
    return _CROP_EACH(jobs, config)

  def crop_job(job, *args):
    crops[job] += 1
    return _CROP_JOB(job, *args)
  monkeypatch.setattr(tfds_common, "crop_each", crop_each)
  monkeypatch.setattr(tfds_common, "crop_job", crop_job)
  return crops


def _examples(data_dir: pathlib.Path, builder, margin: float) -> dict[str, list[dict]]:
  """Every field of every example of each prepared split, in order, as lists."""
  path = data_dir / builder.name / tfds_common.crop_config(SIZE, margin).name / "1.0.0"
  prepared = tfds.builder_from_directory(path)
  out = {}
  for split in prepared.info.splits:
    source = prepared.as_data_source(split=split)
    out[split] = [{k: np.asarray(v).tolist() for k, v in source[i].items()}
                  for i in range(len(source))]
  return out


def _journaled(done: collections.Counter) -> collections.Counter:
  """The jobs of `done` that a journal keeps: all but those of missing images."""
  return collections.Counter(j for j in done if os.path.exists(j.path))


def _stopped(module, root, tmp_path, margin: float, monkeypatch, kill_after: int):
  """(the crops of a whole preparation, the data_dir of one stopped by Ctrl-C after `kill_after`
  crops, the crops it made) of `module` (affectnet or fec)."""
  whole = _count_crops(monkeypatch)
  module.prepare(root / "manual", tmp_path / "whole", image_size=SIZE, margin=margin)
  data = tmp_path / "data"
  done = _count_crops(monkeypatch, kill_after=kill_after)
  with pytest.raises(KeyboardInterrupt):
    module.prepare(root / "manual", data, image_size=SIZE, margin=margin)
  return whole, data, done


def test_affectnet_interrupted_resumes_from_its_journal(affectnet_data, tmp_path, monkeypatch,
                                                        caplog):
  """Stopped by Ctrl-C, the crops made are kept; the same command again crops only the faces not
  journaled (a missing image is looked for again) and writes what one uninterrupted run writes."""
  root, _, report = affectnet_data
  whole, data, done = _stopped(affectnet, root, tmp_path, 0.0, monkeypatch, kill_after=16)
  folder, = data.glob("affectnet_spill_48px_margin0_*")
  assert [p.name for p in folder.iterdir() if p.stat().st_size] == ["train_7class.crops"]
  assert f"kept in {folder}: the same command again resumes" in caplog.text
  assert sum(done.values()) == 16 and len(_journaled(done)) == 15  # one image is missing
  crops = _count_crops(monkeypatch)
  with caplog.at_level("INFO"):
    resumed, fresh = affectnet.prepare(root / "manual", data, image_size=SIZE, margin=0.0)
  assert "resuming from 15 crops (1 of them skips)" in caplog.text  # the unreadable image
  assert fresh and crops == whole - _journaled(done) and not list(data.glob("*_spill_*"))
  assert resumed == report
  assert _examples(data, affectnet.Affectnet, 0.0) == _examples(
      root / "data", affectnet.Affectnet, 0.0)


def test_fec_resumes_past_a_torn_journal_tail(fec_data, tmp_path, monkeypatch):
  """A journal whose last record was cut short (a kill mid-write) resumes: that face alone is
  cropped again, and the triplets and report are those of an uninterrupted run."""
  root, _, report = fec_data
  whole, data, done = _stopped(fec, root, tmp_path, 0.25, monkeypatch, kill_after=4)
  journal, = (p for p in data.glob("fec_spill_*/*.crops") if p.stat().st_size)
  with open(journal, "r+b") as f:
    f.truncate(journal.stat().st_size - 3)
  torn = list(_journaled(done))[-1]
  crops = _count_crops(monkeypatch)
  resumed, fresh = fec.prepare(root / "manual", data, image_size=SIZE, margin=0.25)
  assert fresh and crops == whole - _journaled(done) + collections.Counter([torn])
  assert resumed == report and not list(data.glob("*_spill_*"))
  assert _examples(data, fec.Fec, 0.25) == _examples(root / "data", fec.Fec, 0.25)


def _touch(path) -> None:
  """Moves a file's modification time a second on."""
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_a_journal_serves_only_its_settings_and_unchanged_images(affectnet_data, tmp_path,
                                                                 monkeypatch):
  """Another JPEG quality or a changed CSV starts a journal of its own (the same first faces are
  cropped again); a journaled face whose image changed since is cropped again. Once the variant
  is written, every spill folder of it is removed."""
  root, _, _ = affectnet_data
  manual, data = tmp_path / "manual", tmp_path / "data"
  shutil.copytree(root / "manual", manual)
  whole = _count_crops(monkeypatch)
  affectnet.prepare(manual, tmp_path / "whole", image_size=SIZE, margin=0.0)
  first = _count_crops(monkeypatch, kill_after=5)
  with pytest.raises(KeyboardInterrupt):
    affectnet.prepare(manual, data, image_size=SIZE, margin=0.0)
  again = _count_crops(monkeypatch, kill_after=5)
  with pytest.raises(KeyboardInterrupt):
    affectnet.prepare(manual, data, image_size=SIZE, margin=0.0, jpeg_quality=90)
  assert again == first
  _touch(manual / "Manually_Annotated_file_lists" / "validation.csv")  # as an edit would
  edited = _count_crops(monkeypatch, kill_after=5)
  with pytest.raises(KeyboardInterrupt):
    affectnet.prepare(manual, data, image_size=SIZE, margin=0.0)
  assert edited == first and len(list(data.glob("affectnet_spill_*"))) == 3
  changed = next(iter(edited)).path
  _touch(changed)
  crops = _count_crops(monkeypatch)
  assert affectnet.prepare(manual, data, image_size=SIZE, margin=0.0)[1]
  assert crops == whole - collections.Counter(j for j in edited if j.path != changed)
  assert not list(data.glob("affectnet_spill_*"))  # those of the other settings too: useless now


def test_crop_journal_cuts_off_a_garbled_last_record(tmp_path):
  """Results read back as added; a last record garbled (a crash of the machine) fails its CRC
  and is cut off, the journal going on after the record before it; a missing image is not kept."""
  jobs = [tfds_common.Job(os.fspath(tmp_path / f"{i}.jpg"), (0, 0, 4, 4)) for i in range(4)]
  for job in jobs[:3]:
    Image.new("RGB", (8, 8)).save(job.path)
  results = [b"jpeg 0", tfds_common.Skip("unreadable image", "broken", jobs[1].path), b"jpeg 2",
             tfds_common.Skip("missing image", "file not found", jobs[3].path)]
  path = os.fspath(tmp_path / "split.crops")
  with spill.CropJournal(path, "test") as journal:
    for job, result in zip(jobs, results):
      journal.add(job, result)
    assert [journal[j] for j in jobs] == results
  garbled = bytearray(pathlib.Path(path).read_bytes())
  garbled[-1] ^= 1
  pathlib.Path(path).write_bytes(garbled)
  with spill.CropJournal(path, "test") as journal:
    assert [j in journal for j in jobs] == [True, True, False, False]
    journal.add(jobs[2], results[2])
  with spill.CropJournal(path, "test") as journal:
    assert [journal[j] for j in jobs[:3]] == results[:3]
