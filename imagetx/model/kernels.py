"""Fast CPU kernels, kept apart from the readable model in attention.py and layers.py.

Each one computes exactly what the plain code it replaces computes (the tests hold them to it),
only leaner in time or memory on CPU. All were tested with torch 2.14.1.

- local 1D attention from the qkv projection: its own module, imagetx.model.local1d.
- `dropout` / `keep_mask`: dropout with a one-byte keep mask drawn from 16 random bits per element.
- `FeedForwardFunction`: the FFN with the ReLU and its backward in place.
- `residual_dropout_layer_norm`: post-LN LayerNorm(x + dropout(f)) keeping one (B, L, d) tensor.
- `rotate_qkv`: model.relative = "rotary" on a fused q/k/v projection (the local 1D fast path in
  training, and every decoding step).
- `decode_attention`: one query per image against the cached keys, as two batched matmuls.
- `PackedLinear`: a bf16 linear layer whose weight oneDNN reorders once, for decoding.

One switch runs the whole model on the plain reference code instead (dense-mask attention for every
pattern, F.dropout, Linear -> ReLU -> Linear, residual + nn.LayerNorm):

    with imagetx.model.reference_mode():
        ...

and `windowed_local1d()` turns off only the local 1D fast path (model/local1d.py), so that local
1D runs through the windows-and-mask path that autocast and attention dropout take on CPU;
`grouped_local_attention()` runs local 1D through the path it takes on a GPU.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_state = {"kernels": True, "local1d_flash": True, "causal_groups": False}


def enabled() -> bool:
    """True unless inside `reference_mode()`: the model may take the fast paths."""
    return _state["kernels"]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this kind of device, or None when it is off there (or
    the device has no autocast at all, such as meta: torch.is_autocast_enabled raises for it)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def local1d_flash_enabled() -> bool:
    return _state["kernels"] and _state["local1d_flash"]


@contextlib.contextmanager
def _set(key: str, value: bool):
    old = _state[key]
    _state[key] = value
    try:
        yield
    finally:
        _state[key] = old


def reference_mode():
    """Within the block every model runs on the plain reference code: dense-mask attention for
    every pattern (layout.dense_mask), F.dropout, Linear -> ReLU -> Linear, x + f then
    nn.LayerNorm. Slow (the dense mask is (Lp, Lp)); for tests and debugging. Not thread-local."""
    return _set("kernels", False)


def causal_groups_on_cpu() -> bool:
    return _state["kernels"] and _state["causal_groups"]


def grouped_local_attention():
    """Within the block local 1D runs on CPU as on a GPU (local 2D always does): lower-right
    causal attention over each group of blocks' gathered keys (attention.CausalGroups), so that
    the tests hold the GPU's path to the dense reference here."""
    return _set("causal_groups", True)


def windowed_local1d():
    """Within the block local 1D attention runs through the key windows and additive mask
    (attention._blocked) instead of its CPU fast path (model/local1d.py); everything else stays fast."""
    return _set("local1d_flash", False)


# ---- dropout: a one-byte mask from 16 random bits per element ---------------------------------
_LEVELS = 1 << 16


def keep_mask(like: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Dropout with rate 0 < p < 1 for a tensor shaped like `like`: (keep, scale), keep uint8 0/1
    of like's shape, scale = 1 / P(keep). Uses the default generator (so torch.manual_seed and
    activation checkpointing's RNG replay apply). Tested with torch 2.14.1.

    On CPU four elements share one 64-bit draw (16 bits each), about 4x faster than
    `rand_like(x) >= p`; p is rounded to a multiple of 1/65536 and the scale uses the rounded
    value, so the expectation is exact. Elsewhere: `rand >= p`.
    """
    levels = round(p * _LEVELS)
    if like.device.type == "cpu" and 0 < levels < _LEVELS and not torch.compiler.is_compiling():
        n = like.numel()
        bits = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(2**63), None)  # full 64-bit range
        keep = bits.view(torch.int16)[:n] >= levels - _LEVELS // 2  # P = 1 - levels / 65536
        return keep.view(like.shape).view(torch.uint8), _LEVELS / (_LEVELS - levels)
    keep = torch.rand(like.shape, device=like.device) >= p
    return keep.view(torch.uint8), 1.0 / (1.0 - p)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        keep, scale = keep_mask(x, p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of x with rate 0 < p < 1, keeping a one-byte mask (see keep_mask)
    instead of F.dropout's float one. Tested with torch 2.14.1."""
    return _Dropout.apply(x, p)


# ---- the feed-forward block with its ReLU in place --------------------------------------------
class _FeedForward(torch.autograd.Function):
    """relu(x W1^T + b1) W2^T + b2 with the ReLU and its backward in place. Autograd's version
    allocates both anew (two tokens x d_ff tensors per layer and step) and, with an in-place
    ReLU on the view that linear returns, adds two more copies in the backward.

    `dtype` is the compute dtype: x and the weights are cast to it (bf16 under CPU autocast, as
    autocast casts a Linear's inputs) and the output is in it; the gradients come back in the
    inputs' own dtypes (their sums accumulate in float32 either way). Tested with torch 2.14.1."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (tokens, d)
        w1c, b1c, w2c, b2c = (t.to(dtype) for t in (w1, b1, w2, b2))
        h = torch.addmm(b1c, x2, w1c.t()).clamp_min_(0)  # (tokens, d_ff)
        y = torch.addmm(b2c, h, w2c.t())
        ctx.save_for_backward(x2, h, w1c, w2c)
        ctx.shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, w1.dtype
        return y.view(*x.shape[:-1], -1)  # (..., d)

    @staticmethod
    def backward(ctx, grad_y):
        x2, h, w1, w2 = ctx.saved_tensors
        gy = grad_y.reshape(-1, grad_y.shape[-1]).to(h.dtype)  # (tokens, d)
        gh = gy @ w2
        # zero where the ReLU was off, in place (aten::threshold_backward.grad_input)
        torch.ops.aten.threshold_backward.grad_input(gh, h, threshold=0, grad_input=gh)
        gx = (gh @ w1).view(ctx.shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None  # (..., d)
        wd = ctx.w_dtype
        return (
            gx, (gh.t() @ x2).to(wd), gh.sum(0).to(wd), (gy.t() @ h).to(wd), gy.sum(0).to(wd), None,
        )


def feed_forward(x, w1, b1, w2, b2, dtype: torch.dtype | None = None) -> torch.Tensor:
    """relu(x W1^T + b1) W2^T + b2 for x float (..., d) -> (..., d) computed in `dtype` (default
    x's), see _FeedForward."""
    return _FeedForward.apply(x, w1, b1, w2, b2, dtype or x.dtype)


# ---- post-LN residual: LayerNorm(x + dropout(f)) keeping only its output ----------------------
class _ResidualDropoutLayerNorm(torch.autograd.Function):
    """Autograd's version keeps, per sublayer, the LayerNorm's input and a float dropout mask: two
    extra (B, L, d) tensors. This one keeps the output (which the next linear layer keeps anyway),
    the per-row 1/std and a one-byte mask, and recovers the normalized input in the backward pass
    as (y - beta) / gamma (the "memory-efficient" LayerNorm of NVIDIA Apex). At the published
    CIFAR-10 config that is about 1 GB less per training step. Tested with torch 2.14.1."""

    @staticmethod
    def forward(ctx, x, f, weight, bias, p: float, eps: float):
        keep, scale = None, 1.0
        if p > 0:
            keep, scale = keep_mask(f, p)
            s = torch.addcmul(x, f, keep, value=scale)  # x + f * keep * scale in one pass
        else:
            s = x + f
        y, _, rstd = torch.native_layer_norm(s, (x.shape[-1],), weight, bias, eps)
        ctx.scale = scale
        ctx.save_for_backward(y, rstd, weight, bias, keep)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, rstd, weight, bias, keep = ctx.saved_tensors
        # |gamma| is kept away from 0 only to avoid dividing by zero; trained gammas sit near 1.
        inv_w = 1.0 / torch.where(weight.abs() < 1e-6, torch.full_like(weight, 1e-6), weight)
        xhat = torch.addcmul(-bias * inv_w, y, inv_w)  # (y - beta) / gamma in one pass
        zeros = torch.zeros_like(rstd)
        # LayerNorm's backward evaluated at its normalized input (mean 0, 1/std 1), then rescaled
        grad_xhat, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
            grad_y.contiguous(), xhat, (y.shape[-1],), zeros, torch.ones_like(rstd), weight, bias,
            output_mask=[True, True, True],
        )
        grad_s = grad_xhat.mul_(rstd)
        grad_f = grad_s if keep is None else grad_s.mul(keep).mul_(ctx.scale)
        return grad_s, grad_f, grad_w, grad_b, None, None


def residual_dropout_layer_norm(x, f, weight, bias, p: float, eps: float) -> torch.Tensor:
    """LayerNorm(x + dropout(f)) in training, x, f float (..., d); p in [0, 1)."""
    return _ResidualDropoutLayerNorm.apply(x, f, weight, bias, p, eps)


# ---- rotary: the queries and keys of the fused projection rotated in one pass ----------------
def _rotate_into(dst: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """dst = x with dimension i and P + i rotated by the angle of pair i (relative.rotate)."""
    P = cos.shape[-1]
    x1, x2 = x[..., :P], x[..., P : 2 * P]
    d1, d2 = dst[..., :P], dst[..., P : 2 * P]
    torch.mul(x1, cos, out=d1)
    d1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=d2)
    d2.addcmul_(x1, sin)
    dst[..., 2 * P :].copy_(x[..., 2 * P :])


def _rotate_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    B, L, _ = qkv.shape
    out = torch.empty_like(qkv)
    t, o = qkv.view(B, L, 3, heads, -1), out.view(B, L, 3, heads, -1)  # (B, L, 3, h, hd)
    _rotate_into(o[:, :, :2], t[:, :, :2], cos, sin)
    o[:, :, 2].copy_(t[:, :, 2])
    return out


class _RotateQKV(torch.autograd.Function):
    """relative.rotate applied to the queries and keys of a fused projection, written straight
    into one new tensor (autograd's version takes about twice the passes over memory, and a copy
    to put q, k and v back together). The backward rotates the gradient back (angle -theta)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, heads: int):
        cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
        ctx.save_for_backward(cos, sin)
        ctx.heads = heads
        return _rotate_qkv(qkv, cos, sin, heads)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate_qkv(grad.contiguous(), cos, -sin, ctx.heads), None, None, None


def rotate_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv float (B, L, 3 * h * hd) -> the same with q and k rotated at their positions: cos, sin
    (L, P) (relative.RelativePositions). Tested with torch 2.14.1."""
    return _RotateQKV.apply(qkv, cos[:, None, None], sin[:, None, None], heads)  # (L, 1, 1, P): over (3, h)


# ---- decoding: linear layers with their weights reordered once ---------------------------------
# Private oneDNN operators (absent on a torch built without oneDNN; then packing is skipped):
#   mkldnn::_reorder_linear_weight(Tensor self, int? batch_size) -> Tensor
#   mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, str? algorithm) -> Tensor
_reorder_linear_weight = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
_linear_pointwise = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def packing_applies(weight: torch.Tensor) -> bool:
    """Whether `weight` can be packed for oneDNN: a bf16 CPU weight, the operators present, oneDNN
    usable and reference_mode off."""
    return (
        enabled() and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
        and _reorder_linear_weight is not None and _linear_pointwise is not None
        and torch.backends.mkldnn.is_available()
    )


class PackedLinear(torch.nn.Module):
    """An inference-only copy of a bf16 nn.Linear whose weight oneDNN reorders once, for a batch
    of `batch` rows, instead of at every call. At the batch sizes of cached decoding (1-16 rows)
    nn.Linear in bf16 on CPU reads its weight at about half the memory bandwidth; the packed
    weight streams at close to it (benchmarks/sampling.py). Same result as F.linear (the same
    oneDNN kernel computes both). Tested with torch 2.14.1."""

    def __init__(self, linear: torch.nn.Linear, batch: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _reorder_linear_weight(linear.weight.detach(), batch)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear_pointwise(x, self.packed, self.bias, "none", [], "")



def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int = 0, hi: int | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per image and head over the cached keys k[:, :, lo:hi] (no mask),
    for cached decoding: q (B, h, 1, hd), k and v (B, h, N, hd) buffers of q's dtype, with
    0 <= lo < hi <= N -> (B, h, 1, hd) in that dtype. bias: None or additive logits (B, h, 1,
    hi - lo) of those keys (model.relative = "logits").

    On CPU, scaled_dot_product_attention with a single query is slow: in bf16 it takes 4x (batch 1)
    to 10x (batch 16) the time of two batched matmuls around a softmax, and in fp32 at batch 16
    2.4x (320 keys, hd 128, one thread, torch 2.14.1), so the CPU path is those matmuls, with the
    softmax in fp32 (in bf16 the scores are rounded to bf16 once before it, as q and k already
    are). A bf16 matmul over a slice k[:, :, lo:hi] first copies it (the slice's batch dimensions
    are not contiguous), which costs up to 10x the matmul itself: in bf16, when the range holds at
    least half the buffer, the matmuls read the whole buffer and the scores outside the range are
    set to -inf instead. Elsewhere (CUDA, or inside reference_mode) it is
    scaled_dot_product_attention on the slice."""
    N = k.shape[2]
    hi = N if hi is None else hi
    if q.device.type != "cpu" or not enabled():
        return F.scaled_dot_product_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=bias)
    whole = q.dtype != torch.float32 and 2 * (hi - lo) >= N
    if not whole:
        k, v = k[:, :, lo:hi], v[:, :, lo:hi]
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (B, h, 1, keys)
    if bias is not None:
        (scores[..., lo:hi] if whole else scores).add_(bias)
    if whole:
        scores[..., :lo] = -torch.inf
        scores[..., hi:] = -torch.inf
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)
