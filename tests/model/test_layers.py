import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from imagetx.model import reference_mode
from imagetx.model import local1d
from imagetx.model.attention import window_bias
from imagetx.model.kernels import decode_attention, keep_mask
from imagetx.model.layers import FeedForward, dropout, residual_dropout_layer_norm
from imagetx.model.layout import local1d_window_mask


def _window_mask(heads, block, blocks, dtype):
    """The additive window mask the model hands the local 1D kernels."""
    return window_bias(local1d_window_mask(block, blocks), heads, dtype)


def test_memory_lean_residual_layer_norm_matches_autograd():
    torch.manual_seed(0)
    d = 16
    norm = nn.LayerNorm(d).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(3, 5, d, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3, 5, d, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 5, d, dtype=torch.float64)
    for p in (0.0, 0.3):
        torch.manual_seed(1)
        y = residual_dropout_layer_norm(x, f, norm, p, training=True)
        grads = torch.autograd.grad(y, (x, f, norm.weight, norm.bias), gy)
        keep, scale = y.new_ones(y.shape), 1.0
        if p:
            torch.manual_seed(1)
            keep, scale = keep_mask(f, p)
        ref = norm(x + f * keep * scale)
        ref_grads = torch.autograd.grad(ref, (x, f, norm.weight, norm.bias), gy)
        torch.testing.assert_close(y, ref)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)
    # evaluation: plain LayerNorm(x + f)
    y = residual_dropout_layer_norm(x, f, norm, 0.3, training=False)
    torch.testing.assert_close(y, norm(x + f))


def test_keep_mask_rate_and_scale():
    torch.manual_seed(0)
    like = torch.empty(1000, 1001)  # numel not a multiple of the 4 masks per random draw
    for p in (0.1, 0.3, 0.5):
        keep, scale = keep_mask(like, p)
        assert keep.dtype == torch.uint8 and keep.shape == like.shape and set(keep.unique().tolist()) <= {0, 1}
        rate = keep.double().mean().item()
        assert abs(rate - (1 - p)) < 0.004  # about 8 standard deviations at 1e6 draws
        assert abs(scale * (1 - p) - 1) < 1e-4  # p is used to 1/65536
        lanes = keep.view(-1)[:1000 * 1000].view(-1, 4).double().mean(0)  # each 16-bit lane of a draw
        assert (lanes - (1 - p)).abs().max() < 0.008
    a, _ = keep_mask(like, 0.3)
    b, _ = keep_mask(like, 0.3)
    assert not torch.equal(a, b)  # fresh bits every call
    torch.manual_seed(5)
    c, _ = keep_mask(like, 0.3)
    torch.manual_seed(5)
    assert torch.equal(c, keep_mask(like, 0.3)[0])  # reproducible from the seed


def test_dropout_scales_kept_values_and_their_gradients():
    torch.manual_seed(0)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.25, training=True)
    kept = y != 0
    assert 0.6 < kept.float().mean() < 0.9
    torch.testing.assert_close(y[kept], x[kept] / (1 - 0.25), rtol=1e-4, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g[kept], torch.full_like(g[kept], 1 / (1 - 0.25)), rtol=1e-4, atol=0)
    assert (g[~kept] == 0).all()
    assert dropout(x, 0.25, training=False) is x


def test_feed_forward_matches_autograd():
    torch.manual_seed(0)
    ffn = FeedForward(8, 20).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 7, 8, dtype=torch.float64)
    y = ffn(x)
    grads = torch.autograd.grad(y, (x, *ffn.parameters()), gy)
    first, _, second = ffn
    ref = second(torch.relu(first(x)))
    ref_grads = torch.autograd.grad(ref, (x, *ffn.parameters()), gy)
    torch.testing.assert_close(y, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), ref)


@given(
    batch=st.integers(1, 3), heads=st.integers(1, 3), head_dim=st.integers(1, 9), size=st.integers(1, 40),
    data=st.data(), bf16=st.booleans(),
)
def test_decode_attention_equals_attention_over_the_range(batch, heads, head_dim, size, data, bf16):
    """Whether it slices or reads the whole buffer with the outside masked, the one-query decoding
    kernel attends to exactly k[:, :, lo:hi] (the rest of the buffer holds arbitrary finite values)."""
    lo = data.draw(st.integers(0, size - 1), label="lo")
    hi = data.draw(st.integers(lo + 1, size), label="hi")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    dtype = torch.bfloat16 if bf16 else torch.float32
    q, k, v = (3 * torch.randn(batch, heads, n, head_dim, generator=g) for n in (1, size, size))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    exact = F.scaled_dot_product_attention(q.double(), k[:, :, lo:hi].double(), v[:, :, lo:hi].double())
    out = decode_attention(q, k, v, lo, hi)
    assert out.dtype == dtype and out.shape == (batch, heads, 1, head_dim)
    tol = dict(atol=0.1, rtol=0.05) if bf16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), exact, **tol)
    with reference_mode():
        torch.testing.assert_close(decode_attention(q, k, v, lo, hi).double(), exact, **tol)


@given(
    images=st.integers(1, 3), blocks=st.integers(1, 4), block=st.integers(1, 9), heads=st.integers(1, 2),
    head_dim=st.integers(1, 16), seed=st.integers(0, 2**16),
)
def test_bf16_local1d_matmul_attention_is_as_close_as_the_flash_split(images, blocks, block, heads, head_dim, seed):
    """The bf16 local 1D kernel (batched matmuls, P kept in bf16) against the flash split in float64:
    output and qkv gradient within bf16 rounding, no further off than the flash split in bf16."""
    g = torch.Generator().manual_seed(seed)
    L = blocks * block
    qkv = torch.randn(images, L, 3 * heads * head_dim, generator=g)
    grad = torch.randn(images, L, heads * head_dim, generator=g)
    x64 = qkv.double().requires_grad_()
    o64 = local1d._Local1DFlash.apply(x64, heads, block)
    (g64,) = torch.autograd.grad(o64, x64, grad.double())
    o64 = o64.detach()
    errors = {}
    mask = _window_mask(heads, block, blocks, torch.bfloat16)
    for fn in (local1d._Local1DFlash, local1d._Local1DMatmul):
        x = qkv.bfloat16().requires_grad_()
        o = fn.apply(x, heads, block) if fn is local1d._Local1DFlash else fn.apply(x, heads, block, mask)
        (gx,) = torch.autograd.grad(o, x, grad.bfloat16())
        assert o.dtype == gx.dtype == torch.bfloat16
        o, gx = o.detach().double(), gx.double()
        errors[fn] = (float((o - o64).abs().max()), float((gx - g64).abs().max()) / float(g64.abs().max()))
    (flash_o, flash_g), (mm_o, mm_g) = errors[local1d._Local1DFlash], errors[local1d._Local1DMatmul]
    assert mm_o <= 2 * flash_o + 0.02 and mm_g <= 2 * flash_g + 0.02, errors


def _local1d_windows_reference(qkv, heads, block, bias):
    """Local 1D attention written out block by block in the dtype given: each block's queries
    over [previous block | own block] of its image, own half causal, scale hd^-0.5, plus
    bias (B, h, blocks, block, 2 block)."""
    B, L, three_a = qkv.shape
    hd = three_a // (3 * heads)
    q, k, v = (t.view(B, L, heads, hd).transpose(1, 2) for t in qkv.split(three_a // 3, dim=-1))
    out = []
    for b in range(L // block):
        own = slice(b * block, (b + 1) * block)
        keys = slice(max(b - 1, 0) * block, (b + 1) * block)
        width = block if b == 0 else 2 * block  # the first block has no previous block
        logits = q[:, :, own] @ k[:, :, keys].transpose(-1, -2) * hd**-0.5 + bias[:, :, b, :, -width:]
        i = torch.arange(block)[:, None]
        j = torch.arange(width)[None, :] - (width - block)  # key index within the own block
        logits = logits.masked_fill(j > i, float("-inf"))
        out.append(torch.softmax(logits, -1) @ v[:, :, keys])
    return torch.cat(out, 2).transpose(1, 2).reshape(B, L, -1)


@given(
    images=st.integers(1, 2), blocks=st.integers(1, 3), block=st.integers(1, 7), heads=st.integers(1, 2),
    head_dim=st.integers(1, 8), bf16=st.booleans(), seed=st.integers(0, 2**16),
)
def test_local1d_matmul_attention_with_a_bias_equals_the_windows_written_out(images, blocks, block, heads, head_dim, bf16, seed):
    """model.relative = "logits" on the local 1D fast path: _Local1DMatmul with an additive bias
    over each block's window, output and the gradients of qkv and of the bias, against the
    attention written out block by block in float64 (float32 and bfloat16)."""
    g = torch.Generator().manual_seed(seed)
    L = blocks * block
    qkv = torch.randn(images, L, 3 * heads * head_dim, generator=g)
    bias = torch.randn(images, heads, blocks, block, 2 * block, generator=g)
    grad = torch.randn(images, L, heads * head_dim, generator=g)
    x64, b64 = qkv.double().requires_grad_(), bias.double().requires_grad_()
    o64 = _local1d_windows_reference(x64, heads, block, b64)
    g64 = torch.autograd.grad(o64, (x64, b64), grad.double())
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, b = qkv.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_()
    o = local1d._Local1DMatmul.apply(x, heads, block, _window_mask(heads, block, blocks, dtype), b)
    gx = torch.autograd.grad(o, (x, b), grad.to(dtype))
    o = o.detach()
    assert o.dtype == dtype and all(t.dtype == dtype for t in gx)
    tol = 0.05 if bf16 else 1e-5
    assert float((o.double() - o64.detach()).abs().max()) <= tol
    for ours, exact in zip(gx, g64):
        assert float((ours.double() - exact).abs().max()) <= tol * max(1.0, float(exact.abs().max()))


@given(
    images=st.integers(1, 3), blocks=st.integers(1, 4), block=st.integers(1, 9), heads=st.integers(1, 2),
    head_dim=st.integers(1, 16), bf16=st.booleans(), with_bias=st.booleans(), data=st.data(),
)
def test_local1d_matmul_attention_never_reads_a_later_position(images, blocks, block, heads, head_dim, bf16, with_bias, data):
    """_Local1DMatmul, bit for bit: the outputs before position t do not move when every q, k and v
    (and bias entry) from t on is redrawn, and a gradient on them alone gives exactly zero gradient
    from t on. Its mask makes those logits -inf, whose weight is exactly 0 forward and backward."""
    L = blocks * block
    t = data.draw(st.integers(0, L - 1), label="t")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    dtype = torch.bfloat16 if bf16 else torch.float32
    qkv = torch.randn(images, L, 3 * heads * head_dim, generator=g).to(dtype)
    bias = torch.randn(images, heads, blocks, block, 2 * block, generator=g).to(dtype) if with_bias else None
    later = qkv.clone()
    later[:, t:] = torch.randn(images, L - t, 3 * heads * head_dim, generator=g).to(dtype)
    later_bias = None
    if with_bias:  # redraw every logit bias a query before t could not use: keys from t on
        later_bias = bias.clone()
        key = torch.arange(2 * block) - block + block * torch.arange(blocks)[:, None, None]  # (blocks, 1, 2 block)
        later_bias.masked_scatter_((key >= t).expand(images, heads, blocks, block, 2 * block),
                                   torch.randn(bias.shape, generator=g).to(dtype))
    x = qkv.clone().requires_grad_()
    mask = _window_mask(heads, block, blocks, dtype)
    out = local1d._Local1DMatmul.apply(x, heads, block, mask, bias)
    assert torch.equal(out[:, :t], local1d._Local1DMatmul.apply(later, heads, block, mask, later_bias)[:, :t])
    grad = torch.zeros_like(out)
    grad[:, :t] = torch.randn(images, t, heads * head_dim, generator=g).to(dtype)
    (gx,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(gx[:, t:], torch.zeros_like(gx[:, t:]))
