"""The properties every Image Transformer must have, whatever its geometry, as checks that raise
AssertionError with a description of the first violation.

test_properties.py runs them on model geometries drawn by Hypothesis; test_shipped_configs.py on
every file in configs/ at its real image, block and flange sizes. Each check takes a model and
inputs built by `model_inputs`.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from imagetx.model import dmol, grouped_local_attention, reference_mode, windowed_local1d
from imagetx.model.decoding import for_decoding, teacher_forced_outputs


def model_inputs(config, batch: int = 2, seed: int = 0):
    """Random images (long (B, H, W, C)), labels and source images that `config` accepts."""
    g = torch.Generator().manual_seed(seed)
    H, W = config.image_size
    x = torch.randint(0, 256, (batch, H, W, config.channels), generator=g)
    labels = torch.randint(0, config.num_classes, (batch,), generator=g) if config.num_classes else None
    source = None
    if config.consistent:  # its likelihood is over the images consistent with the source: x is one
        from imagetx.data.transforms import area_downsample

        source = area_downsample(x.to(torch.uint8), config.source_size).long()
    elif config.source_size is not None:
        source = torch.randint(0, 256, (batch, *config.source_size, config.channels), generator=g)
    return x, labels, source


def generation_index(model) -> torch.Tensor:
    """long (L,): grid position (raster order) -> its step in the model's generation order."""
    order = model.order.cpu()
    index = torch.empty_like(order)
    index[order] = torch.arange(order.numel())
    return index


def in_generation_order(model, out: torch.Tensor) -> torch.Tensor:
    """Model output (B, H, W, ...) in image layout -> (B, L, features) in generation order."""
    return out.reshape(out.shape[0], model.config.seq_len, -1)[:, model.order]


class _CaptureHidden(nn.Module):
    """Stands in for the output head: keeps the final hidden states it is given (B, L, d), grid
    order, and returns a zero view of the head's output shape without computing it."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.hidden = None

    def forward(self, h):
        self.hidden = h
        return h.new_zeros(()).expand(*h.shape[:-1], self.out_features)


@contextlib.contextmanager
def hidden_states_as_outputs(model):
    """Within the block, `model_outputs` reads the final hidden states instead of the head's
    outputs. The head maps each position on its own, so both depend on the same inputs; on large
    grids the (L, 256) logits cost most of a forward pass of a tiny model."""
    head = model.head
    model.head = _CaptureHidden(head.out_features)
    try:
        yield
    finally:
        model.head = head


def model_outputs(model, x, labels=None, source=None) -> torch.Tensor:
    """The model's outputs (B, L, features) in generation order, in inference mode."""
    with torch.inference_mode():
        out = model(x, labels, source)
        if isinstance(model.head, _CaptureHidden):
            return model.head.hidden[:, model.order]
        return in_generation_order(model, out)


def _repeat(t, n):
    return None if t is None else t[:1].expand(n, *t.shape[1:])


def check_dependencies(model, x, labels=None, source=None, shifts=(1, 128), chunk: int = 256) -> None:
    """The whole dependency graph of the first image: change every sub-pixel (by each shift,
    modulo 256), batched, and compare every output of the model with the unchanged image's.

    - No output may move when a sub-pixel at its own step or a later one in generation order
      changes (a DMOL output is a whole pixel: none of its channels may be seen).
    - Every output after the first must move for at least one earlier sub-pixel.
    """
    model.eval()
    cfg = model.config
    per_position = cfg.channels if cfg.output == "dmol" else 1  # sub-pixels per sequence position
    step_of = generation_index(model)  # grid position -> generation step
    base = model_outputs(model, x[:1], _repeat(labels, 1), _repeat(source, 1))[0]  # (L, F)
    tol = 1e-5 * (1.0 + float(base.abs().max()))
    sub_pixels = x[0].numel()
    jobs = [(s, shift) for shift in shifts for s in range(sub_pixels)]
    reached = torch.zeros(cfg.seq_len, dtype=torch.bool)  # outputs some earlier sub-pixel moved
    steps = torch.arange(cfg.seq_len)
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        n = len(part)
        s = torch.tensor([j[0] for j in part])
        shift = torch.tensor([j[1] for j in part])
        flat = x[:1].reshape(1, -1).repeat(n, 1)
        rows = torch.arange(n)
        flat[rows, s] = (flat[rows, s] + shift) % 256
        out = model_outputs(model, flat.view(n, *x.shape[1:]), _repeat(labels, n), _repeat(source, n))
        moved = (out - base).abs().amax(-1) > tol  # (n, L) generation order
        step = step_of[s // per_position]  # generation step of each changed sub-pixel
        leak = moved & (steps[None, :] <= step[:, None])
        if leak.any():
            i = int(leak.any(1).nonzero()[0])
            H, W, C = x.shape[1:]
            r, rest = divmod(int(s[i]), W * C)
            seen_at = leak[i].nonzero().flatten().tolist()
            raise AssertionError(
                f"sub-pixel (row {r}, col {rest // C}, channel {rest % C}) at generation step "
                f"{int(step[i])} (shift {int(shift[i])}) moved the outputs at steps {seen_at[:12]}"
                f"{' ...' if len(seen_at) > 12 else ''} (it may only move later ones)"
            )
        reached |= moved.any(0)
    missing = (~reached[1:]).nonzero().flatten() + 1
    assert missing.numel() == 0, f"outputs at steps {missing[:12].tolist()} depend on no earlier sub-pixel"


def _loss_and_grads(model, x, labels, source):
    model.zero_grad()
    nll = model.nll(x, labels, source)
    nll.sum().backward()
    return nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_fast_equals_dense(model, x, labels=None, source=None) -> None:
    """Every fast path gives the reference's likelihood and gradients (reference_mode: dense-mask
    attention, plain layers; train mode, which takes the same paths as training; the model must
    have no dropout)."""
    cfg = model.config
    assert cfg.dropout == 0 and cfg.attention_dropout == 0, "dropout would make the paths differ"
    model.train()
    with reference_mode():
        ref, ref_grads = _loss_and_grads(model, x, labels, source)
    paths = {"fast": contextlib.nullcontext}
    if cfg.attention == "local1d":  # local 2D's fast path is the GPU's grouped one
        paths["windowed local 1D"] = windowed_local1d
        paths["grouped (the GPU's path)"] = grouped_local_attention
    try:
        for name, path in paths.items():
            with path():
                nll, grads = _loss_and_grads(model, x, labels, source)
            torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name} path, NLL: {m}")
            assert grads.keys() == ref_grads.keys()
            # float32 summation order differs: relative to each gradient's own scale, plus float32
            # noise on the model's overall gradient scale for gradients that are zero in exact
            # arithmetic (e.g. the queries of a cross-attention over a single key)
            overall = max(float(g.abs().max()) for g in ref_grads.values())
            for key in grads:
                scale = float(ref_grads[key].abs().max())
                err = float((grads[key] - ref_grads[key]).abs().max())
                assert err <= 5e-5 * scale + 1e-6 * overall, (
                    f"{name} path: gradient of {key} differs by {err:.3g} (scale {scale:.3g}, overall {overall:.3g})")
    finally:
        model.zero_grad()
        model.eval()


def _relative_error(a: dict, ref: dict) -> float:
    """||a - ref|| / ||ref|| over all the gradients as one vector."""
    diff = sum(float((a[k] - ref[k]).double().square().sum()) for k in ref)
    return (diff / (sum(float(ref[k].double().square().sum()) for k in ref) + 1e-24)) ** 0.5


def check_bf16_fast_paths_match_the_bf16_reference(model, x, labels=None, source=None) -> None:
    """Under CPU bf16 autocast every fast training path (bf16 kernels, the local 1D flash split and
    bf16 matmul attention) is as close to the float32 likelihood and gradients as the plain
    reference code under the same autocast: bf16 rounding, no worse.

    The gradients are compared as one vector (relative L2 error), not parameter by parameter:
    in these tiny models some ReLU units sit at their threshold, where bf16 rounding flips one
    and moves a small gradient (one bias) by a large part of itself; which path flips it is chance
    (an example: the flash and matmul attention kernels, identical in fp32, both 19% off on one
    FFN bias, the reference 0.7%). check_fast_equals_dense holds every parameter's gradient to
    the reference in float32."""
    cfg = model.config
    assert cfg.dropout == 0 and cfg.attention_dropout == 0, "dropout would make the paths differ"
    model.train()
    try:
        exact, exact_grads = _loss_and_grads(model, x, labels, source)
        with torch.autocast("cpu", dtype=torch.bfloat16), reference_mode():
            ref, ref_grads = _loss_and_grads(model, x, labels, source)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, fast_grads = _loss_and_grads(model, x, labels, source)
        assert fast.dtype == torch.float32 and all(g.dtype == torch.float32 for g in fast_grads.values())
        assert fast_grads.keys() == exact_grads.keys()
        nll_err, ref_nll_err = float((fast - exact).abs().max()), float((ref - exact).abs().max())
        assert nll_err <= 2 * ref_nll_err + 1e-2 * float(exact.abs().max()), (nll_err, ref_nll_err)
        fast_err, ref_err = _relative_error(fast_grads, exact_grads), _relative_error(ref_grads, exact_grads)
        assert fast_err <= 2 * ref_err + 0.02, (
            f"bf16 fast path: gradients off by {fast_err:.3g} (relative L2), the bf16 reference by {ref_err:.3g}")
    finally:
        model.zero_grad()
        model.eval()


def total_variation(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Total variation distance between distributions over the last dimension."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def check_bf16_decoder_is_close_to_fp32(model, x, labels=None, source=None, bound: float = 0.02) -> None:
    """The bf16 cached decoder (for_decoding: bf16 weights and caches, oneDNN-packed linear layers
    on CPU) gives conditionals within total variation `bound` of the float32 model's, fed the
    same prefix, at every step."""
    model.eval()
    cfg = model.config
    full = model_outputs(model, x, labels, source)  # (B, L, features), generation order
    cached = teacher_forced_outputs(for_decoding(model, torch.bfloat16, x.shape[0]), x, labels, source)
    cached = cached.float().reshape(full.shape)

    def log_probs(out):
        if cfg.output == "categorical":
            return out.log_softmax(-1)
        image = torch.empty_like(out)
        image[:, model.order] = out  # back to image layout, where the DMOL conditionals are read
        return conditional_log_probs(model, image.view(x.shape[0], *cfg.image_size, -1), x)

    tv = total_variation(log_probs(cached), log_probs(full))
    assert float(tv.max()) <= bound, f"bf16 decoder: total variation up to {float(tv.max()):.4f} (mean {float(tv.mean()):.4f})"


def check_fused_decoder_sees_only_the_prefix(model, x, labels=None, source=None) -> None:
    """The bf16 decoder of for_decoding (on a CPU with AVX512-BF16 the fused C step of
    model/native, for every model.relative but "logits") gives, at generation step k, exactly
    the same output whatever the values at steps k and later: each step reads only the prefix
    (bitwise, for every k at once: x against x with every value from k on replaced)."""
    model.eval()
    cfg = model.config
    decoder = for_decoding(model, torch.bfloat16, x.shape[0])
    a = teacher_forced_outputs(decoder, x, labels, source)
    order = model.order
    L = cfg.seq_len
    for k in sorted({0, L // 3, L - 1}):
        flat = x.reshape(x.shape[0], L, -1).clone()
        later = order[k:]
        flat[:, later] = 255 - flat[:, later]
        b = teacher_forced_outputs(decoder, flat.view_as(x), labels, source)
        assert torch.equal(a[:, : k + 1], b[:, : k + 1]), f"the output at a step up to {k} changed with the values from step {k} on"


def check_cache_equals_full_pass(model, x, labels=None, source=None) -> None:
    """The cached incremental decoder, fed the true prefix, gives model(x)'s output at every step."""
    model.eval()
    full = model_outputs(model, x, labels, source)
    cached = teacher_forced_outputs(model, x, labels, source)
    cached = cached.reshape(full.shape)
    if model.config.output == "categorical":  # the distributions themselves, at every step
        torch.testing.assert_close(cached.log_softmax(-1), full.log_softmax(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def check_same_samples_with_and_without_cache(model, labels=None, source=None, seed: int = 0) -> None:
    """The same generator seed gives identical images from the cached decoder and from the
    full-recompute reference sampler."""
    n = labels.shape[0] if labels is not None else source.shape[0] if source is not None else 2
    a = model.sample(n, labels, source, generator=torch.Generator().manual_seed(seed))
    b = model.sample(n, labels, source, generator=torch.Generator().manual_seed(seed), use_cache=False)
    assert a.dtype == torch.uint8 and a.shape == (n, *model.config.image_size, model.config.channels)
    differ = (a != b).reshape(n, -1).any(1).sum()
    assert torch.equal(a, b), f"{int(differ)} of {n} images differ between the cached and the reference sampler"


def conditional_log_probs(model, out: torch.Tensor, x: torch.Tensor, source=None) -> torch.Tensor:
    """Model output for images x -> float32 (B, H, W, C, 256): log p(sub-pixel = v | everything
    the model conditions it on), computed straight from the logits (restricted to the values
    consistent with the source for model.consistent) or the mixture parameters."""
    cfg = model.config
    if cfg.output == "categorical":
        return model.log_probs(out, x, source)
    return dmol.dmol_log_probs(out, x.long(), cfg.channels, cfg.num_mixtures)


def check_bits_per_dim(model, x, labels=None, source=None) -> None:
    """model.nll equals the negative log-probability of x read off the model's own outputs, each
    conditional distribution sums to one, and bits/dim is nll / (H*W*C ln 2)."""
    model.eval()
    with torch.inference_mode():
        out = model(x, labels, source)
        nll = model.nll(x, labels, source)
    log_p = conditional_log_probs(model, out, x, source).double()  # (B, H, W, C, 256)
    torch.testing.assert_close(log_p.logsumexp(-1), torch.zeros(log_p.shape[:-1], dtype=torch.float64), rtol=0, atol=1e-4)
    direct = -log_p.gather(-1, x.long()[..., None]).reshape(x.shape[0], -1).sum(1)
    torch.testing.assert_close(nll.double(), direct, rtol=1e-5, atol=1e-3)
    bpd = nll.double() / (model.config.num_dims * math.log(2))
    torch.testing.assert_close(bpd, direct / (x[0].numel() * math.log(2)), rtol=1e-5, atol=1e-5)


def windows_as_dense(lay) -> torch.Tensor:
    """The local 2D window mask (what the fast path and the cache use) mapped back to (Lp, Lp)
    internal indices, to compare key for key with the dense definition."""
    qh, qw = lay.query_shape
    fh, fw = lay.flange
    Hp, Wp = lay.padded_grid
    kh, kw = fh + qh, qw + 2 * fw
    nbw = Wp // qw
    dense = torch.zeros(lay.internal_len, lay.internal_len, dtype=torch.bool)
    grid_to_internal = torch.full((Hp, Wp), -1, dtype=torch.long)
    grid_to_internal[lay.row_of, lay.col_of] = torch.arange(lay.internal_len)
    for blk in range(lay.num_blocks):
        bi, bj = divmod(blk, nbw)
        r = bi * qh - fh + torch.arange(kh)[:, None].expand(kh, kw).reshape(-1)
        c = bj * qw - fw + torch.arange(kw)[None, :].expand(kh, kw).reshape(-1)
        inside = (r >= 0) & (r < Hp) & (c >= 0) & (c < Wp)
        keys = grid_to_internal[r.clamp(0, Hp - 1), c.clamp(0, Wp - 1)]
        m = lay.window_mask[blk] & inside[None, :]  # (block, window)
        q, k = m.nonzero(as_tuple=True)
        dense[blk * lay.block + q, keys[k]] = True
    return dense


def check_masks(model) -> None:
    """The attention pattern itself: the dense definition lets no real position see a later one
    in generation order, and (local 2D) the fast path's windows describe it key for key."""
    lay = model.layout
    mask = lay.dense_mask(model.config)
    real = lay.valid[:, None] & lay.valid[None, :]
    # internal order restricted to real positions is generation order
    later = (mask & real).triu(1)
    assert not later.any(), f"{int(later.sum())} (query, key) pairs see a later position"
    if lay.kind == "local2d":
        assert torch.equal(windows_as_dense(lay), mask), "the local 2D windows differ from the dense definition"
    if lay.kind == "local1d":
        # window key j of block b sits at internal (b - 1) * lq + j
        lq = lay.block
        q = torch.arange(lay.internal_len)
        b, i = q // lq, q % lq
        keys = (b[:, None] - 1) * lq + torch.arange(2 * lq)[None, :]
        win = lay.window_mask[b, i] & (keys >= 0) & (keys < lay.internal_len)
        dense = torch.zeros_like(mask)
        rows, cols = win.nonzero(as_tuple=True)
        dense[rows, keys[rows, cols]] = True
        assert torch.equal(dense, mask), "the local 1D windows differ from the dense definition"
