"""Flax Linen models: the FaceNet Inception-ResNet-v1 trunk and the paper's face network."""
