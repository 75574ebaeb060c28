"""imagetx: the Image Transformer (Parmar et al., 2018) for autoregressive image generation."""

from imagetx.errors import ConfigError
from imagetx.model.config import ModelConfig
from imagetx.model.transformer import ImageTransformer
from imagetx.checkpoint import load_model  # noqa: E402  (needs the model classes above)

__all__ = ["ConfigError", "ModelConfig", "ImageTransformer", "load_model"]
__version__ = "0.1.1"
