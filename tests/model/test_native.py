"""The fused C decoding step (imagetx/model/native): when it applies, what it computes, and what
happens where it cannot be built. The generated-configuration properties (cache against the full
pass, reading only the prefix) are in test_properties.py; these are the cases around them."""

from __future__ import annotations

import pytest
import torch

from imagetx import ImageTransformer, ModelConfig
from imagetx.model import native, reference_mode
from imagetx.model.decoding import (
    IncrementalDecoder,
    for_decoding,
    teacher_forced_outputs,
)

needs_native = pytest.mark.skipif(
    not (native.enabled() and native.library() is not None),
    reason="this CPU has no AVX512-BF16, or decode.c cannot be built here (no C compiler)",
)


def model(**kw) -> ImageTransformer:
    torch.manual_seed(0)
    cfg = dict(image_size=(6, 6), channels=3, n_layers=2, d_model=40, n_heads=2, d_ff=72, num_classes=0,
               attention="local1d", block_length=20, dropout=0.0)
    return ImageTransformer(ModelConfig(**{**cfg, **kw})).eval()


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(0.5 * (a.float().softmax(-1) - b.float().softmax(-1)).abs().sum(-1).max())


@needs_native
@pytest.mark.parametrize("batch", [1, 5])
def test_fused_step_is_closer_to_fp32_than_the_torch_bf16_path(batch):
    """fp32 sums and one rounding per product input: at least as close as torch's bf16 ops."""
    m = model(d_model=64, n_heads=2, d_ff=96)  # head dim 32, and widths that are not multiples of 32
    x = torch.randint(0, 256, (batch, 6, 6, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(x).reshape(batch, -1, 256)[:, m.order]
    fused_model = for_decoding(m, torch.bfloat16, batch)
    assert native.applies(fused_model)
    fused = teacher_forced_outputs(fused_model, x)
    with native.turned_off():
        torch_model = for_decoding(m, torch.bfloat16, batch)
        assert not native.applies(torch_model)
        plain = teacher_forced_outputs(torch_model, x)
    tv_fused, tv_plain = total_variation(fused, full), total_variation(plain, full)
    assert tv_fused <= 0.01 and tv_fused <= 1.5 * tv_plain, (tv_fused, tv_plain)


@needs_native
def test_fused_sampling_draws_valid_images_with_every_feature():
    """Class labels, a source (cross-attention and source_skip), pre-LN, rotary, local 2D."""
    for kw in (
        dict(num_classes=3),
        dict(source_size=(3, 3), encoder_layers=1, source_skip=True),
        dict(norm="pre", relative="rotary", positional="none"),
        dict(attention="local2d", query_shape=(2, 6), memory_flange=(1, 3)),
        dict(attention="full"),
        dict(attention_dim=96),  # q/k/v wider than d_model and d_ff
    ):
        m = for_decoding(model(**kw), torch.bfloat16, 2)
        assert native.applies(m), kw
        labels = torch.tensor([0, 2]) if kw.get("num_classes") else None
        source = torch.randint(0, 256, (2, 3, 3, 3)) if kw.get("source_size") else None
        images = m.sample(2, labels, source, generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 6, 6, 3) and images.dtype == torch.uint8, kw


def test_where_the_fused_step_does_not_apply():
    bf16 = for_decoding(model(relative="logits"), torch.bfloat16, 1)
    assert not native.applies(bf16)  # relative logits: the torch path
    assert not native.applies(model())  # fp32
    with reference_mode():
        assert not native.applies(for_decoding(model(), torch.bfloat16, 1))
    with native.turned_off():
        assert IncrementalDecoder(for_decoding(model(), torch.bfloat16, 1), 1).fused is None


@needs_native
def test_a_machine_without_a_compiler_keeps_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("IMAGETX_CACHE_DIR", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C compiler .* the slower torch path"):
            assert native.library() is None
        m = for_decoding(model(), torch.bfloat16, 1)
        assert not native.applies(m)
        assert m.sample(1, generator=torch.Generator().manual_seed(0)).shape == (1, 6, 6, 3)
    finally:
        native.library.cache_clear()


@needs_native
def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGETX_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list((tmp_path / "native").glob("decode-*.so"))
        assert len(built) == 1 and not list((tmp_path / "native").glob(".*tmp"))
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    finally:
        native.library.cache_clear()


@needs_native
def test_the_c_and_ctypes_sides_agree_and_a_drift_is_caught(monkeypatch):
    """decode.c exports its ABI number and Layer's size and field offsets; the loader compares
    them with the ctypes mirror, so a field added on one side only cannot go unnoticed."""
    import ctypes

    lib, real = native.library(), native.Layer
    assert native.contract_problem(lib) is None

    class Shorter(ctypes.Structure):
        _fields_ = real._fields_[:-1]

    monkeypatch.setattr(native, "Layer", Shorter)
    assert native.contract_problem(lib) == ("decode.c's Layer and its ctypes mirror differ (fields only in decode.c: "
                                            "['mem_len'], only in ctypes: [])")

    class Swapped(ctypes.Structure):
        fields = list(real._fields_)
        fields.insert(1, fields.pop(12))  # cache_b moved up: same size, same count, wrong places
        _fields_ = fields

    monkeypatch.undo()
    monkeypatch.setattr(native, "Layer", Swapped)
    assert "the same fields in another order" in native.contract_problem(lib)

    class Narrow(ctypes.Structure):  # the same names, one of them narrower than in C
        _fields_ = [(name, ctypes.c_int if name == "mem_b" else kind) for name, kind in real._fields_]

    monkeypatch.undo()
    monkeypatch.setattr(native, "Layer", Narrow)
    assert native.contract_problem(lib) == "Layer.mem_b is 8 bytes at byte 192 in decode.c, 4 at 192 in its ctypes mirror"
    monkeypatch.undo()
    monkeypatch.setattr(native, "ABI", native.ABI + 1)
    assert "DECODE_ABI" in native.contract_problem(lib)
