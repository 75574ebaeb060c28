"""imagetx: the Image Transformer (Parmar et al., 2018) for autoregressive image generation.

Where everything lives, one line a module: docs/architecture.md. The public names below are the
library's entry points: ModelConfig and ImageTransformer build a model, load_model reads a run
directory, checkpoint file or `imagetx export` folder.
"""

from importlib import import_module

__all__ = ["ConfigError", "ModelConfig", "ImageTransformer", "load_model"]
__version__ = "0.1.1"

# Imported on first use, not with the package: `import imagetx` stays free of torch, so the console
# script installs its error boundary (imagetx.cli) before anything slow is imported, and a Ctrl-C
# during start-up is one line, not a traceback.
_HOMES = {"ConfigError": "imagetx.errors", "ModelConfig": "imagetx.model.config",
          "ImageTransformer": "imagetx.model.transformer", "load_model": "imagetx.storage.weights"}


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imagetx' has no attribute {name!r}")
