"""A fused decoding step in C: every decoder layer of one cached-decoding step in one call.

Cached decoding at batch 1 reads every weight once per sub-pixel, so its floor is the time to
stream the weights from memory. Through torch, each layer is some twenty small operations whose
fixed costs (dispatch, oneDNN's per-call set-up, copies of cache slices) take as long as the
reading itself. decode.c does the whole step (self-attention with its cache, cross-attention,
feed-forward, the norms) in one parallel region: bf16 weights and caches read with AVX512-BF16
dot products, fp32 everywhere else (see the comment at its top).

It is compiled on first use with the system's C compiler (`cc`, or $CC) into the cache directory
($IMAGETX_CACHE_DIR, else $XDG_CACHE_HOME/imagetx, else ~/.cache/imagetx; the file name holds a
hash of the source and the compiler's version), linked against the OpenMP runtime torch already
loaded, and called through ctypes. It applies (`applies`) to bf16 decoding on a CPU with
AVX512-BF16, self-attention without relative logits, inside no reference_mode; everything else,
and any machine where it cannot be built (one warning), keeps the torch path. IMAGETX_NATIVE=0
turns it off. The tests hold it to the torch path and to the full forward pass.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from imagetx.model import kernels

SOURCE = Path(__file__).with_name("decode.c")


class Layer(ctypes.Structure):
    """decode.c's Layer: pointers into the decoding model's own tensors and its caches."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("wqkv", "wo", "w1", "b1", "w2", "b2", "ln1_w", "ln1_b", "ln2_w", "ln2_b", "k", "v")),
        ("cache_b", ctypes.c_long), ("cache_h", ctypes.c_long),
        ("k2", ctypes.c_void_p), ("v2", ctypes.c_void_p),
        ("k2_b", ctypes.c_long), ("k2_h", ctypes.c_long),
        *((name, ctypes.c_void_p) for name in ("wq_c", "wo_c", "lnc_w", "lnc_b", "mk", "mv")),
        ("mem_b", ctypes.c_long), ("mem_h", ctypes.c_long), ("mem_len", ctypes.c_long),
    ]


def _cache_dir() -> Path:
    from imagetx.system.paths import cache_root

    root = cache_root(None)
    return (root if root is not None else Path(tempfile.gettempdir()) / "imagetx") / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _openmp_flags() -> list[str]:
    """Link against the libgomp torch ships (and has loaded), so one OpenMP runtime and thread
    pool serves both; the system's, by its soname, otherwise."""
    lib = Path(torch.__file__).parent / "lib"
    if (lib / "libgomp.so.1").exists():
        return ["-fopenmp", f"-L{lib}", "-l:libgomp.so.1", f"-Wl,-rpath,{lib}"]
    return ["-fopenmp"]


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled decode.c (compiled now if needed), or None where it cannot be built or
    loaded (one warning says why)."""
    cc = _compiler()
    if cc is None:
        warnings.warn("no C compiler (cc or $CC) found: cached sampling takes the slower torch path", stacklevel=3)
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
        flags = ["-O3", "-shared", "-fPIC", *_openmp_flags()]
        digest = hashlib.sha256("\0".join([SOURCE.read_text(), version, *flags]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"decode-{digest}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            done = subprocess.run([cc, str(SOURCE), "-o", str(tmp), *flags], capture_output=True, text=True, timeout=300, check=False)
            if done.returncode != 0:
                tmp.unlink(missing_ok=True)
                detail = (done.stderr.strip().splitlines() or ["no message"])[-1][:200]
                raise OSError(f"{cc} failed: {detail}")
            os.replace(tmp, target)  # whole or absent, as every file imagetx writes
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"the fused decoding step could not be built ({exc}): cached sampling takes the slower torch path",
                      stacklevel=3)
        return None
    problem = contract_problem(lib)
    if problem is not None:
        warnings.warn(f"the fused decoding step was not used: {problem}; cached sampling takes the slower torch path "
                      "(this is a bug in imagetx: please report it)", stacklevel=3)
        return None
    lib.decode_step.restype = None
    lib.decode_step.argtypes = [
        ctypes.POINTER(Layer), *[ctypes.c_int] * 8, ctypes.c_float, ctypes.c_void_p, *[ctypes.c_void_p] * 6,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p,
    ]
    lib.decode_scratch_floats.restype = ctypes.c_long
    lib.decode_scratch_floats.argtypes = [ctypes.c_int] * 5 + [ctypes.c_long]
    return lib


ABI = 2  # decode.c's DECODE_ABI that the argtypes above and Layer are written for


def contract_problem(lib: ctypes.CDLL) -> str | None:
    """What differs between decode.c and its ctypes side (None: nothing): its DECODE_ABI, or
    Layer's field names and order, its size, or any field's offset or size."""
    lib.decode_abi.restype = ctypes.c_int
    lib.decode_abi.argtypes = []
    if lib.decode_abi() != ABI:
        return f"decode.c is at DECODE_ABI {lib.decode_abi()}, its ctypes side at {ABI}"
    lib.decode_layer_names.restype = ctypes.c_char_p
    lib.decode_layer_names.argtypes = []
    lib.decode_layer_layout.restype = ctypes.c_long
    lib.decode_layer_layout.argtypes = [ctypes.POINTER(ctypes.c_long), ctypes.POINTER(ctypes.c_long), ctypes.c_int]
    c_names = lib.decode_layer_names().decode().strip(",").split(",")
    names = [name for name, _ in Layer._fields_]
    if c_names != names:
        only_c, only_py = [n for n in c_names if n not in names], [n for n in names if n not in c_names]
        detail = f"fields only in decode.c: {only_c}, only in ctypes: {only_py}" if only_c or only_py else "the same fields in another order"
        return f"decode.c's Layer and its ctypes mirror differ ({detail})"
    offsets, sizes = (ctypes.c_long * len(names))(), (ctypes.c_long * len(names))()
    size = lib.decode_layer_layout(offsets, sizes, len(names))
    if size != ctypes.sizeof(Layer):
        return f"decode.c's Layer is {size} bytes, its ctypes mirror {ctypes.sizeof(Layer)}"
    for name, offset, width in zip(names, offsets, sizes):
        field = getattr(Layer, name)
        if (field.offset, field.size) != (offset, width):
            return (f"Layer.{name} is {width} bytes at byte {offset} in decode.c, {field.size} at {field.offset} "
                    "in its ctypes mirror")
    return None


_OFF = [False]


@contextlib.contextmanager
def turned_off():
    """Decoders built inside take the torch path (benchmarks compare the two in one run)."""
    before, _OFF[0] = _OFF[0], True
    try:
        yield
    finally:
        _OFF[0] = before


def enabled() -> bool:
    """IMAGETX_NATIVE is not "0", neither turned_off nor reference_mode is on, and this CPU has
    AVX512-BF16."""
    from imagetx.system.cpu import cpu_bf16_features

    return (
        os.environ.get("IMAGETX_NATIVE", "1") != "0" and not _OFF[0] and kernels.enabled()
        and "avx512_bf16" in cpu_bf16_features()
    )


def applies(model) -> bool:
    """Whether `model`'s decoding steps can take the fused path (then the library is built)."""
    p = next(model.parameters())
    cfg = model.config
    return (
        p.device.type == "cpu" and p.dtype == torch.bfloat16 and cfg.relative != "logits"
        and enabled() and library() is not None
    )


ROWS, CHUNK = 16, 32  # decode.c's packing


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 (O, I) weight in decode.c's layout: blocks of 16 rows, each as its chunks of 32
    columns, each chunk as its 16 rows (zeros past O and I): a block is one contiguous run."""
    O, I = weight.shape
    Op, Ip = -(-O // ROWS) * ROWS, -(-I // CHUNK) * CHUNK
    padded = weight.new_zeros(Op, Ip)
    padded[:O, :I] = weight
    return padded.view(Op // ROWS, ROWS, Ip // CHUNK, CHUNK).permute(0, 2, 1, 3).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _longs(values) -> ctypes.Array:
    return (ctypes.c_long * len(values))(*values)


class FusedStep:
    """The decoder layers of an IncrementalDecoder's model as one decode_step call per step of
    1 to `window` positions.

    model: the bf16 decoding copy (linear layers plain nn.Linear: see decoding.for_decoding);
    caches: the decoder's (self-attention cache, cross MemoryCache or None) per layer, whose
    buffers the C code reads and writes in place."""

    def __init__(self, model, caches: list, batch: int, window: int = 1):
        self.lib = library()
        cfg = model.config
        self.B, self.window = batch, window
        self.d, self.h, self.hd, self.f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
        self.pre_norm = int(cfg.norm == "pre")
        self.eps = model.blocks[0].norm_attn.eps
        self.keep: list[torch.Tensor] = []  # every tensor a pointer refers to stays alive
        layers = []
        keys = 0
        for block, (cache, memory) in zip(model.blocks, caches):
            layer = Layer()
            attn, ffn = block.attn, block.ffn
            for name, t in (
                ("wqkv", pack(attn.qkv.weight)), ("wo", pack(attn.out.weight)), ("w1", pack(ffn[0].weight)),
                ("b1", ffn[0].bias), ("w2", pack(ffn[2].weight)), ("b2", ffn[2].bias),
                ("ln1_w", block.norm_attn.weight), ("ln1_b", block.norm_attn.bias),
                ("ln2_w", block.norm_ffn.weight), ("ln2_b", block.norm_ffn.bias),
            ):
                setattr(layer, name, self._hold(t))
            k, v = cache.buffers()
            if k.stride(2) != k.shape[3] or v.stride() != k.stride():
                raise ValueError("the fused decoding step takes caches (B, h, N, hd) with rows of hd")
            layer.k, layer.v = self._hold(k, contiguous=False), self._hold(v, contiguous=False)
            layer.cache_b, layer.cache_h = k.stride(0), k.stride(1)
            keys = max(keys, k.shape[2])
            second = cache.second_buffers()
            if second is not None:
                k2, v2 = second
                layer.k2, layer.v2 = self._hold(k2, contiguous=False), self._hold(v2, contiguous=False)
                layer.k2_b, layer.k2_h = k2.stride(0), k2.stride(1)
            if memory is not None:
                cross = block.cross
                for name, t in (("wq_c", pack(cross.q.weight)), ("wo_c", pack(cross.out.weight)),
                                ("lnc_w", block.norm_cross.weight), ("lnc_b", block.norm_cross.bias)):
                    setattr(layer, name, self._hold(t))
                mk, mv = memory.k.contiguous(), memory.v.contiguous()  # (B, h, S, hd): rows of hd
                layer.mk, layer.mv = self._hold(mk), self._hold(mv)
                layer.mem_b, layer.mem_h, layer.mem_len = mk.stride(0), mk.stride(1), mk.shape[2]
                keys = max(keys, mk.shape[2])
            layers.append(layer)
        self.layers = (Layer * len(layers))(*layers)
        self.keys = keys
        a = self.h * self.hd
        n = self.lib.decode_scratch_floats(batch * window, self.d, a, self.f, self.h, keys)
        self.scratch = torch.empty(n, dtype=torch.float32)
        self.x = torch.empty(batch * window, self.d, dtype=torch.float32)
        # local 2D parallel passes read the keys from the ring (see ring_places): per block, its
        # window's keys in visibility order as ring rows
        cache = caches[0][0]
        self.ring_rows = None
        if window > 1 and cache.second_buffers() is not None:
            rows = [cache.ring_rows(b) for b in range(model.layout.num_blocks)]
            self.ring_rows = torch.tensor(rows, dtype=torch.long)  # (blocks, window) CPU: this path is CPU only
            self.ring_cache = cache
        # rotary: every position's angles in fp32, once; a step passes its row
        rotary = model.relative if cfg.relative == "rotary" else None
        self.cos = None if rotary is None else rotary.cos.float().contiguous()
        self.sin = None if rotary is None else rotary.sin.float().contiguous()

    def _hold(self, t: torch.Tensor, contiguous: bool = True) -> int:
        if t.dtype != torch.bfloat16 or t.device.type != "cpu":
            raise ValueError(f"the fused decoding step takes bf16 CPU tensors, got {t.dtype} on {t.device}")
        if contiguous and not t.is_contiguous():
            raise ValueError("the fused decoding step takes contiguous weights")
        if t.stride(-1) != 1:
            raise ValueError("the fused decoding step takes caches whose last dimension is contiguous")
        self.keep.append(t)
        return t.data_ptr()

    def __call__(self, x: torch.Tensor, slot: int, lo: int, hi: int, off2: int, internal: int) -> torch.Tensor:
        """One position: x (B, 1, d), the decoder input at this position, with its cache places
        (cache.prepare()) and internal index -> the last layer's output (B, 1, d) in x's dtype."""
        return self.run(x, [slot], [lo], [hi], [off2], [internal])

    def ring_places(self, internals: list[int]) -> tuple[list[int], ...]:
        """A local 2D pass's places in ring mode: the keys stay in the ring, where each position
        writes its key (a ring row) and reads its block's keys (ring_rows) -> (slot, lo, hi, rows_at)."""
        cache = self.ring_cache
        width = cache.ring_k.shape[3]
        slots, his, at = [], [], []
        for internal in internals:
            blk, i = divmod(internal, cache.lq)
            row, col = cache.ring_place(internal)
            slots.append(row * width + col)
            his.append(cache.count[blk][i])
            at.append(blk * self.ring_rows.shape[1])
        return slots, [0] * len(internals), his, at

    def run(self, x: torch.Tensor, slot, lo, hi, off2, internals, rows_at=None) -> torch.Tensor:
        """W positions of each image: x (B, W, d) their decoder inputs; per position its cache
        places (lists of W ints: see FullCache.prepare; off2 None without second buffers) and
        internal index; rows_at: None, or the ring mode's (ring_places) -> the last layer's
        outputs (B, W, d) in x's dtype. Each row is computed as a one-position step computes it."""
        W = x.shape[1]
        if W > self.window:
            raise ValueError(f"this fused step takes at most {self.window} positions, got {W}")
        out = self.x[: self.B * W]
        out.copy_(x.reshape(self.B * W, self.d))
        cos = sin = None
        P = 0
        if self.cos is not None:
            first = internals[0]
            if internals == list(range(first, first + W)):  # consecutive rows (always for one position): a view
                cos, sin = self.cos[first : first + W], self.sin[first : first + W]
            else:  # a local 2D pass across padding: (W, P) contiguous copies
                cos, sin = self.cos[internals], self.sin[internals]
            P = cos.shape[1]
        ring = rows_at is not None
        self.lib.decode_step(
            self.layers, len(self.layers), self.B, W, self.d, self.h, self.hd, self.f, self.pre_norm, self.eps,
            out.data_ptr(), _longs(slot), _longs(lo), _longs(hi), None if off2 is None or ring else _longs(off2),
            self.ring_rows.data_ptr() if ring else None, _longs(rows_at) if ring else None,
            _ptr(cos), _ptr(sin), P, self.keys, self.scratch.data_ptr(),
        )
        return out.to(x.dtype).view(self.B, W, self.d)
