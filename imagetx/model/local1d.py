"""Local 1D attention on CPU straight from the fused qkv projection (B, L, 3 * h * hd), the fast
path of AttentionLayer for model.attention = "local1d" (attention.py holds the general paths):

- in float32, `_Local1DFlash`: two calls of the CPU flash-attention kernels on strided views of
  qkv per block (its own block causally, the previous block whole), merged by log-sum-exp;
- in bfloat16, `_Local1DMatmul`: batched bf16 matmuls over each block's 2-block key window,
  because the CPU flash kernels are no faster in bf16 than in fp32; with relative logits (an
  additive bias, which the flash kernels do not take) `_Local1DMatmul` in either dtype.

`applies` says when the path runs (model/kernels.py holds the switches that turn it off);
`attend` runs it. Each computes exactly what the windows-and-mask path computes (tests/model/test_layers.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imagetx.model import kernels

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
        return _split_backward(grad, qkv, o, lse, first, ctx.heads, ctx.block, ctx.scale), None, None


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


def applies(qkv: torch.Tensor, dropout: float) -> bool:
    """The flash split (or, in bf16, _Local1DMatmul) runs on CPU in float32 or bfloat16 without
    attention dropout, when the operators exist and neither reference_mode nor
    windowed_local1d is on."""
    return (
        kernels.local1d_flash_enabled() and dropout == 0.0 and qkv.device.type == "cpu"
        and qkv.dtype in (torch.float32, torch.bfloat16)
        and flash_forward is not None and flash_backward is not None
    )


def attend(qkv: torch.Tensor, heads: int, block: int, mask: torch.Tensor, bias_fn=None) -> torch.Tensor:
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
