"""Flax NNX port of Qwen2.5-VL with transformers-exact numerics."""
from .config import Qwen25VLConfig, TextConfig, VisionConfig
from .convert import from_pretrained, save_pretrained
from .model import Output, Qwen25VL

__all__ = ["Qwen25VL", "Qwen25VLConfig", "TextConfig", "VisionConfig", "Output", "from_pretrained", "save_pretrained"]
