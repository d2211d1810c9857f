"""The PyTorch peer of tools/benchmark.py: our face network, VGGish and fusion GRU in torch.

Each module mirrors its Flax original layer for layer (the Inception blocks are built from the
very branch tables of `avemo_jax.models.inception_resnet`, so the two cannot drift apart), in
the NCHW layout and eager mode a PyTorch user gets (facenet-pytorch 2.6 defines the trunk the
same way). Parameter counts equal ours; torch's GRU alone carries two redundant bias vectors per
layer (b_hr, b_hz next to b_ir, b_iz), which `redundant_gru_biases` counts.

The train steps use the same loss terms and the same optimizer as `avemo_jax.train.steps`
(global-norm clipping, then AdamW). Only tools/benchmark.py imports this module, and only when
torch is installed (the `bench` extra); training never does.
"""
from collections.abc import Callable, Sequence

import ml_collections
import torch
from torch import nn
from torch.nn import functional as F

from avemo_jax.models import audio as audio_lib
from avemo_jax.models import inception_resnet as ir
from avemo_jax.models.fusion import MODALITIES

BN = dict(eps=ir.BN_EPSILON, momentum=1.0 - ir.BN_MOMENTUM)


class BasicConv2d(nn.Sequential):
  """Conv (no bias) -> BatchNorm -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
    super().__init__(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
                     nn.BatchNorm2d(cout, **BN), nn.ReLU())


def _branches(cin: int, table: ir.Branches, width: float) -> tuple[nn.ModuleList, int]:
  """The parallel conv chains of an Inception block and their total output channels."""
  branches, total = nn.ModuleList(), 0
  for _, specs in table:
    chain, c = [], cin
    for features, *rest in specs:
      out = ir.scaled_channels(features, width)
      chain.append(BasicConv2d(c, out, *rest))
      c = out
    branches.append(nn.Sequential(*chain))
    total += c
  return branches, total


class Residual(nn.Module):
  """Block35/17/8: branches -> concat -> 1x1 conv (bias) -> x + scale * up -> ReLU."""

  def __init__(self, block: type[ir._Residual], cin: int, scale: float, width: float,
               relu: bool = True):
    super().__init__()
    self.branches, c = _branches(cin, block.BRANCHES, width)
    self.conv2d = nn.Conv2d(c, cin, 1)
    self.scale, self.relu = scale, relu

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.scale * self.conv2d(torch.cat([b(x) for b in self.branches], 1))
    return F.relu(x) if self.relu else x


class Reduction(nn.Module):
  """Mixed_6a/7a: conv branches plus a 3x3/2 max-pool branch."""

  def __init__(self, block: type[ir._Reduction], cin: int, width: float):
    super().__init__()
    self.branches, c = _branches(cin, block.BRANCHES, width)
    self.out_channels = c + cin

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([b(x) for b in self.branches] + [F.max_pool2d(x, 3, 2)], 1)


class InceptionResnetV1(nn.Sequential):
  """The trunk up to `cut`, as `avemo_jax.models.inception_resnet.InceptionResnetV1`."""

  def __init__(self, cut: str, width: float, depth: Sequence[int]):
    s = lambda c: ir.scaled_channels(c, width)
    layers = [BasicConv2d(3, s(32), 3, 2), BasicConv2d(s(32), s(32), 3),
              BasicConv2d(s(32), s(64), 3, 1, 1), nn.MaxPool2d(3, 2),
              BasicConv2d(s(64), s(80), 1), BasicConv2d(s(80), s(192), 3),
              BasicConv2d(s(192), s(256), 3, 2)]
    c = s(256)
    layers += [Residual(ir.Block35, c, 0.17, width) for _ in range(depth[0])]
    layers.append(m6 := Reduction(ir.Mixed6a, c, width))
    c = m6.out_channels
    layers += [Residual(ir.Block17, c, 0.10, width) for _ in range(depth[1])]
    layers.append(m7 := Reduction(ir.Mixed7a, c, width))
    c = m7.out_channels
    if cut == "block8":
      layers += [Residual(ir.Block8, c, 0.20, width) for _ in range(depth[2])]
      layers.append(Residual(ir.Block8, c, 1.0, width, relu=False))
    super().__init__(*layers)
    self.out_channels = c


class DenseLayer(nn.Sequential):
  """BN -> ReLU -> 1x1 conv (4*growth) -> BN -> ReLU -> 3x3 conv (growth), convs without bias."""

  def __init__(self, cin: int, growth: int):
    super().__init__(nn.BatchNorm2d(cin, **BN), nn.ReLU(),
                     nn.Conv2d(cin, 4 * growth, 1, bias=False), nn.BatchNorm2d(4 * growth, **BN),
                     nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))


class FaceNet(nn.Module):
  """uint8 faces [B, 3, H, W] -> (logits, embedding), as `avemo_jax.models.face.FaceNet`."""

  def __init__(self, m: ml_collections.ConfigDict):
    super().__init__()
    self.trunk = InceptionResnetV1(m.cut, m.width, m.depth)
    c = self.trunk.out_channels
    self.proj = BasicConv2d(c, m.proj_features, 1)
    c = m.proj_features
    self.dense = nn.ModuleList()
    for _ in range(m.dense_layers):
      self.dense.append(DenseLayer(c, m.growth))
      c += m.growth
    self.reduce = BasicConv2d(c, m.feature_dim, 1)
    self.embedding = nn.Linear(m.feature_dim, m.embed_dim)
    self.logits = nn.Linear(m.feature_dim, m.num_classes)

  def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = self.proj(self.trunk((images.float() - 127.5) / 128.0))
    for layer in self.dense:
      x = torch.cat([x, layer(x)], 1)
    feature = self.reduce(x).mean((2, 3))
    return self.logits(feature), F.normalize(self.embedding(feature), dim=-1, eps=1e-6)


class VGGish(nn.Module):
  """log-mel [B, 96, 64] -> (valence/arousal [B, 2], embedding), as `models.audio.VGGish`."""

  def __init__(self, a: ml_collections.ConfigDict):
    super().__init__()
    layers, c = [], 1
    for _, convs, channels in audio_lib.BLOCKS:
      out = max(1, round(channels * a.width))
      for _ in range(convs):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
        c = out
      layers.append(nn.MaxPool2d(2))
    self.features = nn.Sequential(*layers)
    flat = (audio_lib.NUM_FRAMES // 16) * (audio_lib.NUM_BANDS // 16) * c
    self.fc = nn.Sequential(nn.Linear(flat, a.fc_dim), nn.ReLU(), nn.Linear(a.fc_dim, a.fc_dim),
                            nn.ReLU(), nn.Linear(a.fc_dim, a.embed_dim), nn.ReLU())
    self.va_head = nn.Linear(a.embed_dim, 2)

  def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = self.features(mel[:, None])
    embedding = self.fc(x.permute(0, 2, 3, 1).flatten(1))  # NHWC flatten, as VGGish's TF order
    return self.va_head(embedding), embedding


class FusionGRU(nn.Module):
  """{modality: [B, T, D]} -> valence/arousal [B, T, 2], as `models.fusion.FusionGRU`."""

  def __init__(self, f: ml_collections.ConfigDict, modalities: Sequence[str], dims: dict[str, int]):
    super().__init__()
    self.modalities, self.f = tuple(modalities), f
    unknown = set(self.modalities) - set(MODALITIES)
    if unknown or f.level not in ("model", "feature"):
      raise ValueError(f"modalities {self.modalities}, level {f.level!r}: see models/fusion.py")
    gru = lambda d: nn.GRU(d, f.hidden, batch_first=True)
    if f.level == "model":
      self.per_modality = nn.ModuleList([gru(dims[m]) for m in self.modalities])
      c = f.hidden * len(self.modalities)
    else:
      c = sum(dims[m] for m in self.modalities)
    self.layers = nn.ModuleList()
    for _ in range(f.num_layers):
      self.layers.append(gru(c))
      c = f.hidden
    self.va_head = nn.Linear(c, 2)

  def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
    xs = [F.dropout(features[m], self.f.dropout, self.training) for m in self.modalities]
    if self.f.level == "model":
      xs = [g(x)[0] for g, x in zip(self.per_modality, xs)]
    if self.training and self.f.modality_dropout and len(xs) > 1:
      keep = torch.rand(xs[0].shape[0], len(xs), device=xs[0].device) >= self.f.modality_dropout
      keep |= ~keep.any(1, keepdim=True)
      xs = [x * keep[:, i, None, None] for i, x in enumerate(xs)]
    x = torch.cat(xs, -1)
    for g in self.layers:
      x = g(x)[0]
    return self.va_head(x)


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def redundant_gru_biases(model: nn.Module) -> int:
  """Parameters torch's GRU has beyond Flax's GRUCell: b_hr and b_hz ([H] each) per layer."""
  return sum(2 * g.hidden_size for g in model.modules() if isinstance(g, nn.GRU))


def _triplet_loss(emb_Tx3xD: torch.Tensor, labels_T: torch.Tensor, margins_T: torch.Tensor):
  """`avemo_jax.losses.triplet_loss`: similar pair (e1, e2), odd face e3, squared distances."""
  first = (labels_T == 0).long()
  second = torch.where(labels_T == 2, 1, 2)
  take = lambda i: emb_Tx3xD[torch.arange(len(i)), i]
  e1, e2, e3 = take(first), take(second), take(labels_T)
  d = lambda a, b: (a - b).square().sum(-1)
  return F.relu(d(e1, e2) - d(e1, e3) + margins_T) + F.relu(d(e1, e2) - d(e2, e3) + margins_T)


def _ccc(pred_NxK: torch.Tensor, target_NxK: torch.Tensor) -> torch.Tensor:
  """`avemo_jax.losses.ccc` per column (population moments), all frames valid."""
  mx, my = pred_NxK.mean(0), target_NxK.mean(0)
  cov = ((pred_NxK - mx) * (target_NxK - my)).mean(0)
  return 2 * cov / (pred_NxK.var(0, unbiased=False) + target_NxK.var(0, unbiased=False)
                    + (mx - my).square() + 1e-8)


def _regression(weights: dict[str, float]) -> Callable:
  """The weighted "ccc" (1 - CCC, mean over valence and arousal) and "mse" terms."""
  def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    terms = {"ccc": (1 - _ccc(pred, target)).mean(), "mse": (pred - target).square().mean()}
    return sum(w * terms[k] for k, w in weights.items())
  return loss


def face_loss(stage: ml_collections.ConfigDict) -> Callable:
  """Teacher loss: weighted "ce" on the labelled faces and "triplet" on the FEC triplets; the
  step's faces go through the network in one pass, as in `steps.teacher_step`."""
  margins = torch.tensor(stage.triplet_margins)
  w = dict(stage.loss)

  def loss(model, batch):
    faces, triplets = batch["faces"], batch["triplets"]
    nf, nt = len(faces["label"]), len(triplets["label"])
    logits, emb = model(torch.cat([faces["image"], triplets["images"].flatten(0, 1)]))
    terms = {"ce": F.cross_entropy(logits[:nf], faces["label"]),
             "triplet": _triplet_loss(emb[nf:].reshape(nt, 3, -1), triplets["label"],
                                      margins.to(emb.device)[triplets["triplet_type"]]).mean()}
    return sum(w[k] * terms[k] for k in w)
  return loss


def audio_loss(stage: ml_collections.ConfigDict) -> Callable:
  regression = _regression(dict(stage.loss))
  return lambda model, batch: regression(model(batch["mel"])[0], batch["labels"])


def fusion_loss(stage: ml_collections.ConfigDict) -> Callable:
  regression = _regression(dict(stage.loss))
  return lambda model, batch: regression(model(batch).flatten(0, 1), batch["labels"].flatten(0, 1))


def train_step(model: nn.Module, stage: ml_collections.ConfigDict, loss: Callable
               ) -> Callable[[dict], torch.Tensor]:
  """One eager step: loss, backward, global-norm clipping, AdamW (as `state.make_optimizer`, at
  the peak learning rate)."""
  model.train()
  kernels = [p for p in model.parameters() if p.ndim >= 2]  # decayed, as `state.decayed`'s
  others = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": kernels}, {"params": others, "weight_decay": 0.0}],
                          lr=stage.learning_rate, weight_decay=stage.weight_decay)

  def step(batch):
    opt.zero_grad(set_to_none=True)
    value = loss(model, batch)
    value.backward()
    nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
    opt.step()
    return value.detach()
  return step


def infer_step(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
  """Eval-mode forward pass without autograd; returns the first output."""
  model.eval()

  def infer(x):
    with torch.inference_mode():
      out = model(x)
    return out[0] if isinstance(out, tuple) else out
  return infer


def to_torch(tree, device: str, *, nchw: bool = False):
  """Numpy batch -> torch tensors on `device`; `nchw` moves image channels first (the layout a
  torch data pipeline produces)."""
  if isinstance(tree, dict):
    return {k: to_torch(v, device, nchw=nchw) for k, v in tree.items()}
  x = torch.from_numpy(tree)
  if nchw and x.dtype == torch.uint8:
    x = x.movedim(-1, -3).contiguous()
  if x.dtype in (torch.int32, torch.int64):
    x = x.long()
  return x.to(device)


def synchronize(device: str) -> None:
  if device.startswith("cuda"):
    torch.cuda.synchronize()
