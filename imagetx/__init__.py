"""imagetx: the Image Transformer (Parmar et al., 2018) for autoregressive image generation.

Where everything lives, one line a module: docs/architecture.md. The public names below are the
library's entry points: ModelConfig and ImageTransformer build a model, load_model reads a run
directory, checkpoint file or `imagetx export` folder.
"""

from imagetx.errors import ConfigError
from imagetx.model.config import ModelConfig
from imagetx.model.transformer import ImageTransformer
from imagetx.checkpoint import load_model  # noqa: E402  (needs the model classes above)

__all__ = ["ConfigError", "ModelConfig", "ImageTransformer", "load_model"]
__version__ = "0.1.1"
