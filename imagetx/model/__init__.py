"""The Image Transformer: attention patterns, layers, output likelihoods and the model.

`reference_mode()` runs every model on the plain reference code instead of the fast kernels of
kernels.py (dense-mask attention, F.dropout, plain FFN and LayerNorm); `windowed_local1d()` turns
off only the CPU local 1D flash split.
"""

from imagetx.model.kernels import reference_mode, windowed_local1d

__all__ = ["reference_mode", "windowed_local1d"]
