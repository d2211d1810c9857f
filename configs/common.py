"""Shared pieces of every config: data, model and one training stage.

Every key the code reads is declared here with a default and a comment; configs are
locked, so a misspelt `--config.x.y=...` override or read fails loudly.
"""
import ml_collections


def is_tiny(arg: str | None) -> bool:
  """The config file's argument (`--config=configs/x.py:tiny`): "tiny", or none for full size."""
  if arg not in (None, "", "tiny"):
    raise ValueError(f"config argument {arg!r}: 'tiny' (configs/x.py:tiny) or none (full size)")
  return arg == "tiny"


def data_config(tiny: bool) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  # "synthetic" (embedded, generated) or "tfds": AffectNet, FEC, unlabelled faces and RECOLA
  # prepared by tools/prepare_*.py (README) under data_dir; the synthetic-only keys are then unused.
  d.source = "synthetic"
  d.data_dir = ""  # tfds: the --data_dir the prepare tools wrote to
  d.affectnet_classes = 8  # tfds: 8 (codes 0-7) or 7 (Contempt left out; set model.num_classes=7)
  d.unlabelled = "folder"  # tfds: "folder" (prepare_unlabelled.py) or "affectnet" (its train faces)
  d.crop_margin = 0.1  # tfds: prepared with this --margin (and image_size with --image_size)
  d.clip_stride = 5  # tfds, audio stage: every k-th RECOLA label frame is a training clip (dev: 5k)
  d.image_size = 80 if tiny else 140  # face crop side in pixels (the paper uses 140)
  d.num_train_faces = 512 if tiny else 20_000  # labelled AffectNet-style training faces
  d.num_train_triplets = 256 if tiny else 10_000  # FEC-style training triplets
  d.num_unlabelled = 512 if tiny else 20_000  # extra unlabelled faces for distillation
  d.num_test_faces = 128 if tiny else 600  # held-out identities, clean labels
  d.num_test_triplets = 96 if tiny else 150  # held-out triplets
  d.label_noise = 0.05  # fraction of training labels replaced by another class
  d.annotator_noise = 0.1  # noise of each simulated FEC annotator's distance judgement
  d.crop_pad = 8  # random crop: pad by this many pixels (edge mode), crop back to image_size
  d.flip = True  # random horizontal flip
  d.colour_jitter = 0.2  # max relative brightness / contrast / saturation change
  d.eval_batch = 24 if tiny else 48  # images per evaluation batch (divisible by 3)
  d.num_threads = 2  # Grain read threads (per worker process, or in this process with none)
  d.prefetch = 4  # batches prefetched by Grain
  # Grain worker processes preparing face and audio training batches beside the step (0: threads
  # of this process, sharing its GIL with the step's dispatch; the synthetic renderers are
  # Python-heavy). The fusion stage's windows are always read in this process.
  d.workers = 0 if tiny else 2
  return d


def model_config(tiny: bool) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.cut = "mixed_7a"  # trunk cut point: "mixed_7a" (3x3x1792, the paper) or "block8"
  m.width = 0.25 if tiny else 1.0  # trunk channel multiplier (1.0 = FaceNet)
  m.depth = (1, 1, 1) if tiny else (5, 10, 5)  # blocks in repeat_1 / repeat_2 / repeat_3
  m.proj_features = 32 if tiny else 512  # head: 1x1 conv after the trunk
  m.dense_layers = 2 if tiny else 5  # head: DenseNet block layers
  m.growth = 8 if tiny else 64  # head: DenseNet growth rate
  m.feature_dim = 16 if tiny else 128  # the face feature (fed to fusion later)
  m.embed_dim = 32  # FEC expression embedding (head A)
  m.num_classes = 8  # AffectNet expression logits (head B)
  return m


def schedule_config(tiny: bool, *, steps: int, lr: float) -> ml_collections.ConfigDict:
  """What every training stage has: optimizer schedule, logging, evaluation, checkpoints."""
  s = ml_collections.ConfigDict()
  s.num_steps = 20 if tiny else steps  # optimizer steps
  s.learning_rate = lr  # peak Adam learning rate
  s.warmup_steps = 2 if tiny else 20  # linear warm-up, then cosine decay to 0
  s.weight_decay = 1e-4  # decoupled (AdamW) weight decay of conv and dense kernels
  s.grad_clip = 1.0  # global-norm gradient clipping
  s.log_every = 5 if tiny else 20  # steps between metric lines
  s.eval_every = 10 if tiny else 0  # steps between evaluations (0: only at the end)
  # Checkpoints: at the last step, on SIGTERM, every `checkpoint_every` steps (0: not by steps)
  # and at the first logging step `checkpoint_every_secs` after the last save (0: not by time).
  # By time in the full runs: a step takes 8 ms (fusion GRU, CPU) to 1 s (face, CPU), and on a
  # GPU 100 face steps took 0.3 s; saving every second held the fusion steps up (data wait).
  s.checkpoint_every = 10 if tiny else 0
  s.checkpoint_every_secs = 300
  # A step whose loss or gradient norm is not finite changes nothing; then
  # "stop" the run (naming the step, the terms and the last good checkpoint) or "skip" it (counted).
  s.on_nonfinite = "stop"
  # A jax.profiler trace of `profile_steps` steps (0: none) from the `profile_first`-th step the
  # process runs (1: the first, which compiles), into WORKDIR/<stage>/profile (TensorBoard's
  # profile plugin reads the .xplane.pb, Perfetto the .trace.json.gz).
  s.profile_steps = 0
  s.profile_first = 10
  return s


def stage_config(tiny: bool, *, steps: int, lr: float) -> ml_collections.ConfigDict:
  """One face training stage (teacher or student): schedule, batches, loss weights."""
  s = schedule_config(tiny, steps=steps, lr=lr)
  s.batch_faces = 8 if tiny else 16  # labelled faces per step (global batch)
  # FEC triplets per step (3 faces each); :tiny 8, a multiple of the 8 test devices.
  s.batch_triplets = 8 if tiny else 4
  s.batch_unlabelled = 0  # unlabelled faces per step (distillation only)
  s.triplet_margins = (0.1, 0.2, 0.2)  # per triplet type (one/two/three class), as in FEC
  s.temperature = 2.0  # distillation softmax temperature
  # term -> weight. The paper uses triplet + 0.1 CE on a VGGFace2-pretrained trunk; from random
  # init the trunk needs the CE gradient (measured: acc8 0.40 vs 0.6+ in the default run), so 1.0.
  s.loss = ml_collections.ConfigDict({"triplet": 1.0, "ce": 1.0})
  return s


def sequence_config(tiny: bool) -> ml_collections.ConfigDict:
  """Synthetic audio-visual recordings (the RECOLA stand-in) and audio clips."""
  q = ml_collections.ConfigDict()
  # Many short training recordings: the fusion GRU must generalise across people and voices.
  q.num_train = 4 if tiny else 56  # training recordings
  q.train_seconds = 4.0 if tiny else 6.0  # length of each (25 label frames a second)
  q.num_dev = 2 if tiny else 5  # dev recordings (held-out people and voices)
  q.dev_seconds = 8.0 if tiny else 20.0  # length of each
  q.num_train_clips = 256 if tiny else 8_000  # 1 s voice clips for the audio stage
  q.num_dev_clips = 64 if tiny else 512  # held-out clips for the audio stage's evaluation
  q.feature_batch = 25 if tiny else 75  # frames per forward pass of the frozen extractors
  return q


def audio_config(tiny: bool) -> ml_collections.ConfigDict:
  """VGGish encoder (full: 72,141,184 parameters) and its clip-regression training stage."""
  a = ml_collections.ConfigDict()
  a.width = 0.125 if tiny else 1.0  # conv channel multiplier (1.0 = VGGish)
  a.fc_dim = 64 if tiny else 4096  # the two hidden fully connected layers
  a.embed_dim = 16 if tiny else 128  # the audio embedding fed to fusion
  # ReLU on the embedding, as the first AudioSet release and torchvggish (the results in the
  # README); the current AudioSet code has none: False keeps its negative half (init.audio).
  a.embedding_relu = True
  a.train = schedule_config(tiny, steps=200, lr=3e-4)
  a.train.batch = 16 if tiny else 32  # clips (one 0.96 s log-mel example each) per step
  # term -> weight: "ccc" (1 - CCC over the batch, per dimension) and/or "mse".
  a.train.loss = ml_collections.ConfigDict({"ccc": 1.0, "mse": 1.0})
  return a


def fusion_config(tiny: bool) -> ml_collections.ConfigDict:
  """GRUs over per-frame face features and audio embeddings; one model per entry of `models`."""
  f = ml_collections.ConfigDict()
  f.models = ("audio", "visual", "fused")  # trained and reported in this order
  f.hidden = 16 if tiny else 64  # GRU units
  f.num_layers = 0  # GRU layers over the fused per-frame vectors (level "feature": >= 1)
  f.dropout = 0.2  # on the input features
  # "model": one GRU per modality, their states concatenated; "feature": features concatenated
  f.level = "model"
  f.modality_dropout = 0.0  # fused model, training: P(one modality zeroed for a whole sequence)
  # GRU steps per lax.scan iteration; 0: 1 on CPU (unrolling was slower there), 8 on GPU/TPU
  # (H200: 2.1x the train step of no unrolling; fusion.scan_grus).
  f.unroll = 0
  # "pallas": on NVIDIA GPUs the GRUs' recurrence as one persistent Triton kernel each way (as
  # cuDNN's GRU; models/gru_pallas.py), elsewhere the scan. Not yet measured on a GPU.
  f.gru_kernel = "scan"
  f.chunk_frames = 50 if tiny else 100  # training sub-sequence length (4 s at 25 Hz)
  f.train = schedule_config(tiny, steps=800, lr=1e-3)
  f.train.batch = 8  # sub-sequences per step
  # Added to `seed` for the GRUs' initialisation, dropout and window order only: other values
  # retrain the GRUs on the same cached features (their spread over seeds; README, *Results*).
  f.seed = 0
  # term -> weight, as for audio; both declared so that either can be set from the command line.
  f.train.loss = ml_collections.ConfigDict({"ccc": 1.0, "mse": 0.0})
  return f


def parallel_config() -> ml_collections.ConfigDict:
  """Where and how a run runs, not what it computes: data parallelism over all devices of all
  processes (batch sizes above are global), the compilation cache."""
  p = ml_collections.ConfigDict()
  p.backend = "jit"  # "jit": NamedSharding over a ("data",) mesh; "pmap": one process only
  # jax.distributed.initialize(): "auto" when launched multi-process (TPU VM pod, SLURM, MPI),
  # "on" always (JAX finds the cluster), "off" never; an explicit coordinator_address wins.
  p.distributed = "auto"
  p.coordinator_address = ""  # "host:port" of process 0, for launches JAX cannot detect
  p.num_processes = 1  # with coordinator_address
  p.process_id = 0  # with coordinator_address
  # JAX's persistent compilation cache (avemo_jax/compile_cache.py; the tools' too): a restarted
  # run (preemption) or another run of the same programs loads its compiled steps instead of
  # compiling them; "" off. JAX_COMPILATION_CACHE_DIR wins when set. Several processes: process
  # 0 writes it (give a path every host sees).
  p.compilation_cache = "~/.cache/avemo_jax/xla"
  return p


def base_config(tiny: bool) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed for data, init and augmentation
  # Computation dtype of the face and audio networks: "auto" (bfloat16 on GPU/TPU, float32 on
  # CPU), "float32" or "bfloat16"; parameters, optimizer state, BatchNorm statistics and losses
  # stay float32.
  c.dtype = "auto"
  c.parallel = parallel_config()
  c.data = data_config(tiny)
  c.model = model_config(tiny)
  c.stages = ("teacher",)  # stages run in order, each in WORKDIR/<stage>
  # Sized so that the default distill run (teacher + student, full model, 140x140) finishes in
  # under 30 minutes on 2 CPU cores (~7 faces/s/step there); a GPU does it in a fraction.
  c.teacher = stage_config(tiny, steps=230, lr=2e-3)
  c.student = stage_config(tiny, steps=60, lr=2.5e-4)
  c.teacher_checkpoint = ""  # reuse a teacher: path of a teacher stage dir or its checkpoints/
  # Pretrained starts (README): output folders of tools/convert_*.py; "" = random init.
  c.init = ml_collections.ConfigDict({
      "face_backbone": "",  # teacher trunk from convert_facenet.py (the student: from the teacher)
      "audio": "",  # audio encoder from convert_vggish.py (its valence/arousal head stays random)
  })
  c.student_init = "teacher"  # "teacher" (start from its weights) or "scratch"
  c.max_checkpoints = 2  # checkpoints kept per stage
  c.sequences = sequence_config(tiny)
  c.audio = audio_config(tiny)
  c.fusion = fusion_config(tiny)
  c.student_checkpoint = ""  # fusion: reuse a student (stage dir or checkpoints/), not train one
  c.audio_checkpoint = ""  # fusion: reuse an audio encoder (stage dir or checkpoints/)
  return c
