"""imagetx: the Image Transformer (Parmar et al., 2018) for autoregressive image generation."""

from imagetx.model.config import ConfigError, ModelConfig
from imagetx.model.transformer import ImageTransformer

__all__ = ["ConfigError", "ModelConfig", "ImageTransformer"]
__version__ = "0.1.0"
