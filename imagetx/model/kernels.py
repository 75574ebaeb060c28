"""Fast CPU kernels, kept apart from the readable model in attention.py and layers.py.

Each one computes exactly what the plain code it replaces computes (the tests hold them to it),
only leaner in time or memory on CPU. All were tested with torch 2.14.1.

- `local1d_flash`: local 1D attention from the qkv projection: in float32 two flash-attention
  calls on its views; in bf16 (`_Local1DMatmul`) bf16 batched matmuls over each block's key
  window, because the CPU flash kernels are no faster in bf16 than in fp32; with relative
  logits (an additive bias, which the flash kernels do not take) `_Local1DMatmul` in either dtype.
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

and `windowed_local1d()` turns off only the local 1D flash split, so that local 1D runs through
the windows-and-mask path that CUDA, autocast and attention dropout take.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_state = {"kernels": True, "local1d_flash": True}


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


def windowed_local1d():
    """Within the block local 1D attention runs through the key windows and additive mask
    (attention._blocked) instead of the CPU flash split; everything else stays fast."""
    return _set("local1d_flash", False)


# ---- local 1D attention: the flash split -----------------------------------------------------
# Private aten operators: absent (None) on a torch without them, and then local 1D takes the
# windowed path. Their schemas in torch 2.14.1:
#   _scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p=0., is_causal=False,
#       *, attn_mask=None, scale=None) -> (output, logsumexp)
#   _scaled_dot_product_flash_attention_for_cpu_backward(grad_out, query, key, value, out,
#       logsumexp, dropout_p, is_causal, *, attn_mask=None, scale=None) -> (grad_q, grad_k, grad_v)
flash_forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
flash_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _block_views(qkv: torch.Tensor, heads: int, block: int):
    """qkv (B, L, 3 * h * hd) -> q, k, v as (B * nb, h, block, hd) views, no copy: every block of
    every image is one batch entry, so block m's previous block is entry m - 1."""
    B, L, three_a = qkv.shape
    t = qkv.view(B * (L // block), block, 3, heads, three_a // (3 * heads))  # (B*nb, block, 3, h, hd)
    return tuple(t[:, :, i].transpose(1, 2) for i in range(3))


def _forward(q, k, v, causal: bool, scale: float):
    return flash_forward(q, k, v, dropout_p=0.0, is_causal=causal, scale=scale)


def _backward(g, q, k, v, o, lse, causal: bool, scale: float):
    return flash_backward(g, q, k, v, o, lse, dropout_p=0.0, is_causal=causal, scale=scale)


class _Local1DFlash(torch.autograd.Function):
    """Local 1D attention on CPU straight from the fused qkv projection, with no copies.
    Tested with torch 2.14.1 (it calls the private CPU flash-attention operators above).

    A query block attends to its own block causally and to the whole previous block. The two
    halves are separate flash-attention calls on strided views of qkv (own block: entries m with
    is_causal; previous block: queries of entry m, keys of entry m - 1) merged by their
    log-sum-exps. The first block of each image has no previous block: its log-sum-exp there is
    -inf. The backward runs the flash backward of each half with the merged output and
    log-sum-exp, which is exactly that half's share of the gradient (the split used by ring
    attention); +inf in place of the log-sum-exp gives the excluded half zero weight.
    Replaces the window copies, the additive mask and the layout copies around them.
    """

    @staticmethod
    def forward(ctx, qkv, heads: int, block: int):
        B, L, three_a = qkv.shape
        n = B * (L // block)
        scale = (three_a // (3 * heads)) ** -0.5
        q, k, v = _block_views(qkv, heads, block)
        o, lse = _forward(q, k, v, True, scale)  # o: (n, h, block, hd), memory (n, block, h, hd)
        first = None
        if n > 1:
            o_prev, lse_prev = _forward(q[1:], k[:-1], v[:-1], False, scale)
            first = (torch.arange(1, n, device=qkv.device) % (L // block) == 0).view(-1, 1, 1)
            lse_prev = lse_prev.masked_fill(first, float("-inf"))
            merged = torch.logaddexp(lse[1:], lse_prev)
            weight = torch.exp(lse_prev - merged).unsqueeze(-1).to(o.dtype)  # of the previous block's half
            o[1:].lerp_(o_prev, weight)
            lse[1:] = merged
        ctx.save_for_backward(qkv, o, lse, first)
        ctx.heads, ctx.block, ctx.scale = heads, block, scale
        return o.transpose(1, 2).reshape(B, L, three_a // 3)  # (B, L, h * hd), a view when o is (n, block, h, hd) in memory

    @staticmethod
    def backward(ctx, grad):
        qkv, o, lse, first = ctx.saved_tensors
        args = (ctx.heads, ctx.block, ctx.scale)
        if qkv.dtype == torch.bfloat16 and qkv.shape[-1] // (3 * ctx.heads) <= BF16_BACKWARD_IN_FP32_UP_TO:
            out = _split_backward(grad.float(), qkv.float(), o.float(), lse, first, *args)
            return out.to(torch.bfloat16), None, None
        return _split_backward(grad, qkv, o, lse, first, *args), None, None


# The CPU flash-attention backward in bf16 is slower than in fp32 for small heads (torch 2.14.1,
# Intel AMX, 8 x 1024 positions, 4 heads, blocks of 256: head dim 32 38 vs 19 ms, 64 42 vs 36 ms,
# 128 53 vs 66 ms), so the bf16 split takes its backward in fp32 up to this head dimension.
BF16_BACKWARD_IN_FP32_UP_TO = 64


def _split_backward(grad, qkv, o, lse, first, heads: int, block: int, scale: float) -> torch.Tensor:
    """The gradient of qkv (B, L, 3 * h * hd) for _Local1DFlash, in qkv's dtype."""
    B, L, three_a = qkv.shape
    n = B * (L // block)
    q, k, v = _block_views(qkv, heads, block)
    g = grad.reshape(n, block, heads, -1).transpose(1, 2)  # (n, h, block, hd)
    dq, dk, dv = _backward(g, q, k, v, o, lse, True, scale)
    out = torch.empty_like(qkv)
    gq, gk, gv = _block_views(out, heads, block)
    if n == 1:
        for dst, src in ((gq, dq), (gk, dk), (gv, dv)):
            dst.copy_(src)
        return out
    lse_prev = lse[1:].masked_fill(first, float("inf"))
    dq_p, dk_p, dv_p = _backward(g[1:], q[1:], k[:-1], v[:-1], o[1:], lse_prev, False, scale)
    # Both halves' shares summed straight into the gradient of qkv: the queries of entry m
    # also attended to entry m - 1; the keys and values of entry m also served entry m + 1.
    torch.add(dq[1:], dq_p, out=gq[1:])
    gq[:1].copy_(dq[:1])
    for dst, own, prev in ((gk, dk, dk_p), (gv, dv, dv_p)):
        torch.add(own[:-1], prev, out=dst[:-1])
        dst[-1:].copy_(own[-1:])
    return out


class _Local1DMatmul(torch.autograd.Function):
    """Local 1D attention in bf16 on CPU as batched matmuls over each block's 2-block key window.

    The CPU flash kernels take as long in bf16 as in fp32 (torch 2.14.1, AMD Zen 4, CIFAR-10
    shapes, one thread: 534 ms forward + backward per layer); bf16 batched matmuls run near the
    bf16 matmul peak, and everything between them is one pass over the logits in bf16:

    Forward: S = (scale q) [k_prev | k_own]^T in qkv's dtype (the logits rounded once, as
    autocast's matmul would) plus the model's additive 0/-inf window mask (own half causal; an
    image's first block has no previous block), P = softmax(S) (torch's CPU softmax computes in fp32 and rounds its
    output), o = P [v_prev | v_own].
    Backward: dV = P^T g, dP = g V^T, dS = P (dP - rowsum(P dP)) (torch's softmax backward),
    d(scale q) = dS K, dK = dS^T (scale q), the window halves summed into their blocks.
    In bf16 this rounds dP, which the flash kernels keep in fp32: on CIFAR-10 shapes (random
    qkv) the qkv gradient is then 0.6% off the float64 one by norm (1.2% with queries 3x larger,
    so peaked attention), against 0.5% (0.7%) for the flash kernels in bf16 and 0.6% (1.1%) with
    dP in fp32. The kernel that kept dP in fp32 (and the logits in fp32 between the matmuls) took
    about 60 ms more per layer, forward and backward, on 2 cores.
    Unlike the flash split it keeps P for the backward: 2 bytes per query per window key per head
    (50 MB per layer at the CIFAR-10 config, batch 4); recomputing it costs more than it saves.

    mask: the window mask (1, h * blocks, block, 2 * block), 0 / -inf in qkv's dtype, that the
    model builds once for all layers (attention.window_bias of layout.local1d_window_mask).
    bias: optional additive logits (B, h, blocks, block, 2 * block), any float dtype (model.relative
    = "logits": relative_bias over the windows), added to S before the softmax; its gradient is
    dS. With a bias this also runs in float32, where the flash split cannot take one.
    """

    @staticmethod
    def _window(t: torch.Tensor, per_image: int) -> torch.Tensor:
        """(n, h, block, hd) -> (n, h, 2 * block, hd): [previous block | own block] per entry;
        an image's first entry gets zeros for its previous block (masked anyway)."""
        n, h, blk, hd = t.shape
        w = t.new_empty(n, h, 2 * blk, hd)
        w[:, :, blk:] = t
        w[1:, :, :blk] = t[:-1]
        w[::per_image, :, :blk] = 0
        return w

    @staticmethod
    def forward(ctx, qkv, heads: int, block: int, mask, bias=None):
        B, L, three_a = qkv.shape
        per_image = L // block
        scale = (three_a // (3 * heads)) ** -0.5
        q, k, v = _block_views(qkv, heads, block)  # (n, h, block, hd) each
        kw, vw = _Local1DMatmul._window(k, per_image), _Local1DMatmul._window(v, per_image)
        with torch.autocast(qkv.device.type, enabled=False):  # the dtypes below are chosen
            s = torch.matmul(q * scale, kw.transpose(-1, -2))  # (n, h, block, 2 block)
            by_image = s.view(B, per_image, heads, block, 2 * block)
            by_image.add_(mask.view(heads, per_image, block, 2 * block).transpose(0, 1))
            if bias is not None:  # entries are (image, block), the bias (image, head, block): a view
                by_image.add_(bias.permute(0, 2, 1, 3, 4))
            p = torch.softmax(s, dim=-1)  # every query sees itself: no empty row
            del s, by_image
            o = torch.matmul(p, vw)  # (n, h, block, hd)
        ctx.save_for_backward(qkv, p)
        ctx.heads, ctx.block, ctx.scale = heads, block, scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        return o.transpose(1, 2).reshape(B, L, three_a // 3)  # (B, L, h * hd)

    @staticmethod
    def backward(ctx, grad):
        qkv, p = ctx.saved_tensors
        heads, blk, scale = ctx.heads, ctx.block, ctx.scale
        B, L, _ = qkv.shape
        per_image, n = L // blk, B * (L // blk)
        q, k, v = _block_views(qkv, heads, blk)
        kw, vw = _Local1DMatmul._window(k, per_image), _Local1DMatmul._window(v, per_image)
        g = grad.to(qkv.dtype).reshape(n, blk, heads, -1).transpose(1, 2)  # (n, h, blk, hd)
        dvw = torch.matmul(p.transpose(-1, -2), g)  # (n, h, 2 blk, hd)
        dp = torch.matmul(g, vw.transpose(-1, -2))  # (n, h, blk, 2 blk)
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # d(logits); accumulates in fp32
        del dp
        grad_bias = None
        if ctx.bias_dtype is not None:  # (B, h, blocks, block, 2 block), a view of a copy of dS
            grad_bias = ds.to(ctx.bias_dtype, copy=True).view(B, per_image, heads, blk, 2 * blk).permute(0, 2, 1, 3, 4)
        dq = torch.matmul(ds, kw)  # (n, h, blk, hd): d(scale q)
        dkw = torch.matmul(ds.transpose(-1, -2), q * scale)  # (n, h, 2 blk, hd)
        out = torch.empty_like(qkv)
        gq, gk, gv = _block_views(out, heads, blk)
        torch.mul(dq, scale, out=gq)
        for dst, win in ((gk, dkw), (gv, dvw)):  # each block's keys served it and the next block
            dst.copy_(win[:, :, blk:])
            dst[:-1] += win[1:, :, :blk]
        return out, None, None, None, grad_bias


def local1d_flash_applies(qkv: torch.Tensor, dropout: float) -> bool:
    """The flash split (or, in bf16, _Local1DMatmul) runs on CPU in float32 or bfloat16 without
    attention dropout, when the operators exist and neither reference_mode nor
    windowed_local1d is on."""
    return (
        local1d_flash_enabled() and dropout == 0.0 and qkv.device.type == "cpu"
        and qkv.dtype in (torch.float32, torch.bfloat16)
        and flash_forward is not None and flash_backward is not None
    )


def local1d_flash(qkv: torch.Tensor, heads: int, block: int, mask: torch.Tensor, bias_fn=None) -> torch.Tensor:
    """Local 1D causal attention from qkv float32 or bfloat16 (B, L, 3 * h * hd) on CPU -> (B, L, h * hd):
    _Local1DFlash in float32, _Local1DMatmul in bfloat16. L need not divide into blocks (the tail
    is padded). mask: the model's window mask (1, h * blocks, block, 2 * block), which
    _Local1DMatmul adds. bias_fn: None, or q (B, h, blocks, block, hd) of the padded sequence ->
    additive logits over each block's window (B, h, blocks, block, 2 * block) (model.relative =
    "logits"); then _Local1DMatmul in either dtype."""
    L = qkv.shape[1]
    pad = -L % block
    if pad:
        qkv = F.pad(qkv, (0, 0, 0, pad))
    qkv = qkv.contiguous()
    if bias_fn is None:
        if qkv.dtype == torch.bfloat16:
            o = _Local1DMatmul.apply(qkv, heads, block, mask)
        else:
            o = _Local1DFlash.apply(qkv, heads, block)
    else:
        B, Lp, three_a = qkv.shape
        q = qkv[..., : three_a // 3].view(B, Lp // block, block, heads, -1).permute(0, 3, 1, 2, 4)
        o = _Local1DMatmul.apply(qkv, heads, block, mask, bias_fn(q))
    return o[:, :L] if pad else o


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
