"""The Image Transformer: attention patterns, layers, output likelihoods and the model.

`reference_mode()` runs every model on the plain reference code instead of the fast kernels of
kernels.py (dense-mask attention, F.dropout, plain FFN and LayerNorm); `windowed_local1d()` turns
off only the CPU local 1D flash split; `grouped_local_attention()` runs local 1D on CPU through
the path a GPU takes (local 2D takes it anyway).
"""

from imagetx.model.kernels import grouped_local_attention, reference_mode, windowed_local1d

__all__ = ["grouped_local_attention", "reference_mode", "windowed_local1d"]
