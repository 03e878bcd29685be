#!/usr/bin/env python3
"""PyTorch side of the comet-rs interop contract (bench/INTEROP.md).

Subcommands
-----------
gen      write a seeded input directory (config.json + x, wr, w0, w1, dy as .npy)
ref      compute the MoE layer exactly as ARCHITECTURE.md defines it (forward and
         backward through autograd) and write y, dx, dwr, dw0, dw1, topk_ids, topk_weights
compare  relative L2 error per tensor between two output directories; exit code 1 on failure
bench    (under torchrun) time a PyTorch + NCCL expert-parallel MoE layer, per phase, and
         write the JSON record the comet-rs bench table reads beside its own

Only PyTorch and the standard library are needed (numpy is not used: the .npy files are read
and written by the small codec below, so the script runs in any torch environment).
"""

from __future__ import annotations

import os

# Guard: NVLink multicast must stay off on the shared H200 hosts (GPU-HOSTS.md). Set before
# torch / NCCL initialise, overriding any value inherited from the environment.
_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "NVSHMEM_DISABLE_NVLS": "1",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}
for _k, _v in _MULTICAST_OFF.items():
    os.environ[_k] = _v

import argparse  # noqa: E402
import ast  # noqa: E402
import ctypes  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FORMAT_VERSION = 1
INPUT_FILES = ("x", "wr", "w0", "w1", "dy")
OUTPUT_TENSORS = ("y", "dx", "dwr", "dw0", "dw1")
FORWARD_TENSORS = ("y",)
PHASES = ("routing", "dispatch", "experts", "combine")

# Model presets: (hidden, ffn, experts, top_k, activation, renormalize), keyed by the canonical
# names of comet-core's `Preset` (the JSON "preset" field uses them). Shapes from DESIGN.md;
# renormalisation as comet-core's `Preset::renormalize` (all but Qwen2-MoE). INTEROP.md, "Presets".
PRESETS = {
    "mixtral-8x7b": dict(hidden=4096, ffn=14336, experts=8, top_k=2, activation="swiglu", renormalize=True),
    "qwen2-moe-2.7b": dict(hidden=2048, ffn=1408, experts=64, top_k=4, activation="swiglu", renormalize=False),
    "phi-3.5-moe": dict(hidden=4096, ffn=6400, experts=16, top_k=2, activation="swiglu", renormalize=True),
    "deepseek-v3": dict(hidden=7168, ffn=2048, experts=256, top_k=8, activation="swiglu", renormalize=True),
}
# Accepted spellings, compared after lower-casing and dropping all but letters and digits
# (the same aliases as comet-core's `Preset::from_str`).
_PRESET_ALIASES = {
    "mixtral": "mixtral-8x7b",
    "mixtral8x7b": "mixtral-8x7b",
    "qwen": "qwen2-moe-2.7b",
    "qwen2": "qwen2-moe-2.7b",
    "qwen2moe": "qwen2-moe-2.7b",
    "qwen2moe27b": "qwen2-moe-2.7b",
    "qwen15moe": "qwen2-moe-2.7b",
    "qwen15moea27b": "qwen2-moe-2.7b",
    "phi": "phi-3.5-moe",
    "phi35": "phi-3.5-moe",
    "phi35moe": "phi-3.5-moe",
    "phimoe": "phi-3.5-moe",
    "deepseek": "deepseek-v3",
    "deepseekv3": "deepseek-v3",
    "dsv3": "deepseek-v3",
    "custom": "custom",
}


def canonical_preset(name: str) -> str:
    """`mixtral`, `Mixtral-8x7B`, `phi3.5-moe`, ... → the canonical preset name (or 'custom')."""
    key = "".join(c for c in name.lower() if c.isascii() and c.isalnum())
    if key not in _PRESET_ALIASES:
        raise InteropError(f"preset {name!r} unknown (known: {', '.join(PRESETS)}, custom)")
    return _PRESET_ALIASES[key]

SHAPE_KEYS = ("hidden", "ffn", "experts", "top_k", "activation", "renormalize")


class InteropError(Exception):
    """Bad input or a broken contract: printed as `error: ...`, exit code 2."""


# --------------------------------------------------------------------------------------------
# .npy codec (format 1.0/2.0/3.0, little-endian, C order) without numpy
# --------------------------------------------------------------------------------------------

_DESCR_TO_DTYPE = {
    "<f4": torch.float32,
    "<f8": torch.float64,
    "<i4": torch.int32,
    "<i8": torch.int64,
}
_DTYPE_TO_DESCR = {v: k for k, v in _DESCR_TO_DTYPE.items()}
_NPY_MAGIC = b"\x93NUMPY"

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise SystemExit("error: this script assumes a little-endian host")


def _npy_header(descr: str, shape) -> bytes:
    shape = tuple(int(s) for s in shape)
    text = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, shape)
    body = text.encode("latin1")
    # magic(6) + version(2) + u16 length(2) + header + '\n' padded to a multiple of 64 bytes
    pad = (-(10 + len(body) + 1)) % 64
    body = body + b" " * pad + b"\n"
    if len(body) > 0xFFFF:
        raise InteropError(f"npy header too long ({len(body)} bytes) for shape {shape}")
    return _NPY_MAGIC + b"\x01\x00" + len(body).to_bytes(2, "little") + body


def _raw_bytes(t: torch.Tensor):
    """A buffer over a contiguous CPU tensor's bytes (kept alive by the caller)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return b""
    # The tensor is contiguous, on the CPU and alive for the duration of the write: its
    # storage holds exactly n bytes from data_ptr().
    return (ctypes.c_char * n).from_address(t.data_ptr())


class NpyWriter:
    """Streams a C-order array to a .npy file in chunks along axis 0."""

    def __init__(self, path: str, dtype: torch.dtype, shape):
        if dtype not in _DTYPE_TO_DESCR:
            raise InteropError(f"{path}: unsupported dtype {dtype} for .npy output")
        self.path, self.dtype, self.shape = path, dtype, tuple(int(s) for s in shape)
        self.expected = math.prod(self.shape) * torch.tensor([], dtype=dtype).element_size()
        self.written = 0
        self.f = open(path, "wb")
        self.f.write(_npy_header(_DTYPE_TO_DESCR[dtype], self.shape))

    def write(self, t: torch.Tensor) -> None:
        t = t.detach().to("cpu", self.dtype).contiguous()
        self.f.write(_raw_bytes(t))
        self.written += t.numel() * t.element_size()

    def close(self) -> None:
        self.f.close()
        if self.written != self.expected:
            raise InteropError(f"{self.path}: wrote {self.written} bytes, expected {self.expected}")


def write_npy(path: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Writes a tensor as .npy (f32 unless `dtype` says otherwise)."""
    dtype = dtype or (torch.int32 if not t.is_floating_point() else torch.float32)
    w = NpyWriter(path, dtype, t.shape)
    w.write(t)
    w.close()


def read_npy(path: str) -> torch.Tensor:
    """Reads a little-endian C-order .npy file of f4/f8/i4/i8 into a CPU tensor."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InteropError(f"cannot open {path}: {e.strerror}") from None
    with f:
        if f.read(6) != _NPY_MAGIC:
            raise InteropError(f"{path}: not a .npy file (bad magic)")
        major = f.read(2)[0]
        if major == 1:
            hlen = int.from_bytes(f.read(2), "little")
        elif major in (2, 3):
            hlen = int.from_bytes(f.read(4), "little")
        else:
            raise InteropError(f"{path}: unsupported .npy version {major}")
        try:
            header = ast.literal_eval(f.read(hlen).decode("latin1"))
        except (ValueError, SyntaxError) as e:
            raise InteropError(f"{path}: unreadable .npy header ({e})") from None
        descr = header.get("descr")
        if descr not in _DESCR_TO_DTYPE:
            raise InteropError(
                f"{path}: dtype {descr!r} not supported (expected one of {sorted(_DESCR_TO_DTYPE)})"
            )
        if header.get("fortran_order"):
            raise InteropError(f"{path}: Fortran-order arrays are not accepted (write C order)")
        shape = tuple(header["shape"])
        dtype = _DESCR_TO_DTYPE[descr]
        nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        buf = bytearray(nbytes)
        got = f.readinto(buf)
        if got != nbytes:
            raise InteropError(f"{path}: truncated data ({got} of {nbytes} bytes)")
        if f.read(1):
            raise InteropError(f"{path}: trailing bytes after {nbytes} bytes of data")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def n0_of(cfg) -> int:
    """Rows of w0 per expert: 2F for SwiGLU (gate rows 0..F, up rows F..2F), F for GeLU."""
    return 2 * cfg["ffn"] if cfg["activation"] == "swiglu" else cfg["ffn"]


def validate_shape(cfg, world: int | None = None) -> None:
    """Raises InteropError naming the offending value and its limit."""
    for key in ("hidden", "ffn", "experts", "top_k"):
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InteropError(f"{key} = {v!r}: must be an integer >= 1")
    if cfg.get("activation") not in ("swiglu", "gelu"):
        raise InteropError(f"activation = {cfg.get('activation')!r}: must be 'swiglu' or 'gelu'")
    if not isinstance(cfg.get("renormalize"), bool):
        raise InteropError(f"renormalize = {cfg.get('renormalize')!r}: must be true or false")
    if cfg["top_k"] > cfg["experts"]:
        raise InteropError(f"top_k = {cfg['top_k']} exceeds experts = {cfg['experts']}")
    if world is not None:
        if not isinstance(world, int) or world < 1:
            raise InteropError(f"world = {world!r}: must be an integer >= 1")
        if cfg["experts"] % world != 0:
            raise InteropError(f"experts = {cfg['experts']} is not divisible by world = {world}")


def validate_config(cfg) -> None:
    validate_shape(cfg, cfg.get("world"))
    m = cfg.get("tokens_per_rank")
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise InteropError(f"tokens_per_rank = {m!r}: must be an integer >= 1")
    if cfg.get("dtype") != "bf16":
        raise InteropError(f"dtype = {cfg.get('dtype')!r}: only 'bf16' is defined")


def shape_from_args(args):
    """The layer shape from --preset plus any --hidden/--ffn/... overrides."""
    args.preset = canonical_preset(args.preset)
    base = {} if args.preset == "custom" else dict(PRESETS[args.preset])
    for key in SHAPE_KEYS:
        v = getattr(args, key, None)
        if v is not None:
            base[key] = v
    if "activation" not in base:
        base["activation"] = "swiglu"
    if "renormalize" not in base:
        base["renormalize"] = False
    missing = [k for k in ("hidden", "ffn", "experts", "top_k") if k not in base]
    if missing:
        raise InteropError(f"preset custom needs --{' --'.join(m.replace('_', '-') for m in missing)}")
    return base


def add_shape_args(p) -> None:
    p.add_argument(
        "--preset",
        default="mixtral",
        help=f"{', '.join(PRESETS)} (short forms: mixtral, qwen2-moe, phi3.5-moe, dsv3) or custom",
    )
    p.add_argument("--hidden", type=int, help="override hidden size H")
    p.add_argument("--ffn", type=int, help="override ffn size F")
    p.add_argument("--experts", type=int, help="override expert count E")
    p.add_argument("--top-k", dest="top_k", type=int, help="override top-k")
    p.add_argument("--activation", choices=("swiglu", "gelu"), help="override activation")
    p.add_argument(
        "--renormalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override: divide the k routing weights by their sum",
    )


# --------------------------------------------------------------------------------------------
# The layer as ARCHITECTURE.md defines it
# --------------------------------------------------------------------------------------------


def topk_lower_id(p: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k expert ids per row: largest p first, ties to the lower expert id.

    torch.topk does not specify its tie order, so this uses a stable descending sort: among
    equal values the original (ascending id) order is kept, which is exactly the rule.
    """
    _, idx = torch.sort(p, dim=-1, descending=True, stable=True)
    return idx[:, :k].contiguous()


def route(logits: torch.Tensor, k: int, renormalize: bool):
    """softmax (f32, max-subtracted) → top-k ids (tie rule) → weights (optionally renormalised).

    Returns (p, ids [T,k] int64, w [T,k] f32); w stays differentiable w.r.t. logits.
    """
    p = torch.softmax(logits.float(), dim=-1)
    ids = topk_lower_id(p.detach(), k)
    w = p.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return p, ids, w


def activation_fn(h: torch.Tensor, kind: str, ffn: int) -> torch.Tensor:
    """SwiGLU (silu(gate) * up, gate = first F columns) or exact-erf GeLU, computed in f32."""
    hf = h.float()
    if kind == "swiglu":
        a = F.silu(hf[:, :ffn]) * hf[:, ffn:]
    else:
        a = F.gelu(hf, approximate="none")
    return a.to(h.dtype)


def moe_reference(x, wr, w0, w1, cfg):
    """The whole layer on one device over all world·M tokens (EP does not change the math).

    x [T,H], w0 [E,N0,H], w1 [E,H,F] in the compute dtype (f32 or bf16); wr [E,H] any float
    dtype (logits are computed in f32). Returns (y, ids, w): y [T,H] in the compute dtype.
    GEMMs accumulate in f32; in bf16 mode h, a and o are rounded to bf16 between steps.
    """
    T, H = x.shape
    E, k = cfg["experts"], cfg["top_k"]
    logits = x.float() @ wr.float().t()
    _, ids, w = route(logits, k, cfg["renormalize"])
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, by token inside
    counts = torch.bincount(flat, minlength=E).tolist()
    rows = x.index_select(0, order // k)
    outs = []
    start = 0
    for e in range(E):
        n = counts[e]
        if n == 0:
            continue
        xe = rows[start : start + n]
        h = xe @ w0[e].t()
        a = activation_fn(h, cfg["activation"], cfg["ffn"])
        outs.append(a @ w1[e].t())
        start += n
    o_sorted = torch.cat(outs, 0) if outs else x.new_zeros((0, H))
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    o = o_sorted.index_select(0, inv).view(T, k, H).float()
    y = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    for j in range(k):  # slot order
        y = y + w[:, j : j + 1] * o[:, j]
    return y.to(x.dtype), ids, w


# --------------------------------------------------------------------------------------------
# gen
# --------------------------------------------------------------------------------------------


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    """Rounds to the nearest bf16 value (ties to even), returned as f32."""
    return t.to(torch.bfloat16).float()


def cmd_gen(args) -> int:
    shape = shape_from_args(args)
    cfg = dict(shape)
    cfg.update(
        world=args.world,
        tokens_per_rank=args.tokens,
        dtype="bf16",
        seed=args.seed,
        preset=args.preset,
        route=args.route,
        zero_tokens=args.zero_tokens,
        gen_device=args.device,
        format_version=FORMAT_VERSION,
    )
    validate_config(cfg)
    H, Fd, E, k, W, M = (cfg[n] for n in ("hidden", "ffn", "experts", "top_k", "world", "tokens_per_rank"))
    L = E // W
    N0 = n0_of(cfg)
    T = W * M
    if args.zero_tokens < 0 or args.zero_tokens > M:
        raise InteropError(f"--zero-tokens = {args.zero_tokens}: must be in 0..={M} (tokens per rank)")
    favoured = None
    if args.route == "one-rank":
        if L < k:
            raise InteropError(f"--route one-rank needs experts/world = {L} >= top_k = {k}")
        favoured = list(range(L))  # rank 0's experts
    elif args.route == "sparse":
        favoured = list(range(0, E, 2))
        if len(favoured) < k:
            raise InteropError(f"--route sparse uses the {len(favoured)} even experts, fewer than top_k = {k}")
        if args.zero_tokens and k > 1:
            raise InteropError(
                f"--route sparse with --zero-tokens {args.zero_tokens}: zero tokens tie and go to experts "
                f"0..{k - 1}, odd ones included; use one or the other"
            )

    os.makedirs(args.out, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InteropError("--device cuda: no CUDA device visible to torch")
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=dev)

    x = randn(T, H)
    wr = randn(E, H) / math.sqrt(H)
    if favoured is not None:
        # Skew routing deterministically: every token gets component a along a unit vector u
        # (its own u-component removed first), favoured router rows +b·u, the others −b·u.
        # Logit gap 2ab = 18 against O(1) noise.
        u = randn(H)
        u = u / u.norm()
        a, b = 3.0, 3.0
        x = x - (x @ u)[:, None] * u[None, :] + a * u[None, :]
        sign = -torch.ones((E,), device=dev)
        sign[favoured] = 1.0
        wr = wr + b * sign[:, None] * u[None, :]
    if args.zero_tokens:
        for r in range(W):
            x[r * M : r * M + args.zero_tokens] = 0.0
    x, wr = bf16_round(x), bf16_round(wr)
    write_npy(os.path.join(args.out, "x.npy"), x)
    write_npy(os.path.join(args.out, "wr.npy"), wr)
    w0 = NpyWriter(os.path.join(args.out, "w0.npy"), torch.float32, (E, N0, H))
    for _ in range(E):
        w0.write(bf16_round(randn(N0, H) / math.sqrt(H)))
    w0.close()
    w1 = NpyWriter(os.path.join(args.out, "w1.npy"), torch.float32, (E, H, Fd))
    for _ in range(E):
        w1.write(bf16_round(randn(H, Fd) / math.sqrt(Fd)))
    w1.close()
    write_npy(os.path.join(args.out, "dy.npy"), bf16_round(randn(T, H)))

    # Check the routing property the options promise (on the bf16-rounded values).
    _, ids, _ = route(x @ wr.t(), k, cfg["renormalize"])
    if favoured is not None:
        ok = torch.isin(ids, torch.tensor(favoured, device=dev)).all().item()
        if not ok:
            raise InteropError(f"--route {args.route}: generated routing leaves the favoured experts")
    hist = torch.bincount(ids.reshape(-1), minlength=E)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    print(
        f"gen: {args.out}: H={H} F={Fd} E={E} k={k} {cfg['activation']} renorm={cfg['renormalize']} "
        f"W={W} M={M} route={args.route}; slots per expert min {hist.min().item()} max {hist.max().item()}, "
        f"empty experts {(hist == 0).sum().item()}"
    )
    return 0


# --------------------------------------------------------------------------------------------
# ref
# --------------------------------------------------------------------------------------------


def load_inputs(d: str, device: str = "cpu"):
    """Reads and checks an input directory: (cfg, dict of f32 tensors on `device`; the
    finiteness and bf16-exactness checks run there, which is much faster on a GPU)."""
    path = os.path.join(d, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise InteropError(f"cannot open {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InteropError(f"{path}: invalid JSON ({e})") from None
    validate_config(cfg)
    H, Fd, E, W, M = (cfg[n] for n in ("hidden", "ffn", "experts", "world", "tokens_per_rank"))
    T = W * M
    want = {
        "x": (T, H),
        "wr": (E, H),
        "w0": (E, n0_of(cfg), H),
        "w1": (E, H, Fd),
        "dy": (T, H),
    }
    arrays = {}
    for name, shape in want.items():
        t = read_npy(os.path.join(d, name + ".npy"))
        if t.dtype == torch.float32:
            t = t.to(device)
        if t.dtype != torch.float32:
            raise InteropError(f"{name}.npy: dtype {t.dtype}, expected float32 ('<f4')")
        if tuple(t.shape) != shape:
            raise InteropError(f"{name}.npy: shape {list(t.shape)}, expected {list(shape)} from config.json")
        bad, inexact = 0, 0
        flat = t.reshape(-1)
        for i in range(0, flat.numel(), 1 << 24):  # chunked: inputs can be many GB
            c = flat[i : i + (1 << 24)].view(torch.int32)
            bad += int(((c & 0x7F800000) == 0x7F800000).sum())  # exponent all ones: Inf/NaN
            inexact += int(((c & 0xFFFF) != 0).sum())
        if bad:
            raise InteropError(f"{name}.npy: {bad} non-finite values")
        if inexact:
            raise InteropError(f"{name}.npy: {inexact} values are not bf16-representable (contract: bf16-exact)")
        arrays[name] = t
    return cfg, arrays


def run_reference(cfg, arrays, device: str, dtype: str, to_cpu: bool = True):
    """Forward + backward of the layer; returns a dict of output tensors (f32 / int32), on the
    CPU unless `to_cpu` is false."""
    cdt = torch.float32 if dtype == "f32" else torch.bfloat16
    dev = torch.device(device)
    x = arrays["x"].to(dev, cdt).requires_grad_()
    wr = arrays["wr"].to(dev, cdt).requires_grad_()
    w0 = arrays["w0"].to(dev, cdt).requires_grad_()
    w1 = arrays["w1"].to(dev, cdt).requires_grad_()
    dy = arrays["dy"].to(dev, cdt)
    y, ids, w = moe_reference(x, wr, w0, w1, cfg)
    y.backward(dy)

    def grad(t):
        return t.grad if t.grad is not None else torch.zeros_like(t)

    out = {
        "y": y.detach().float(),
        "dx": grad(x).float(),
        "dwr": grad(wr).float(),
        "dw0": grad(w0).float(),
        "dw1": grad(w1).float(),
        "topk_ids": ids.to(torch.int32),
        "topk_weights": w.detach().float(),
    }
    return {n: t.cpu() for n, t in out.items()} if to_cpu else out


def set_exact_f32() -> None:
    """No TF32 anywhere: f32 means f32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def cmd_ref(args) -> int:
    set_exact_f32()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InteropError("--device cuda: no CUDA device visible to torch")
    cfg, arrays = load_inputs(args.inputs, args.device)
    t0 = time.perf_counter()
    outs = run_reference(cfg, arrays, args.device, args.dtype)
    secs = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    for name, t in outs.items():
        write_npy(os.path.join(args.out, name + ".npy"), t)
    meta = {
        "impl": "torch_reference",
        "dtype": args.dtype,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch_version": torch.__version__,
        "inputs": os.path.abspath(args.inputs),
        "seconds": round(secs, 3),
        "format_version": FORMAT_VERSION,
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"ref: {args.out}: {args.dtype} on {meta['device']}, {secs:.2f} s")
    return 0


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a − b||₂ / ||b||₂ in f64 (0 when both are zero, inf when only b is)."""
    a64, b64 = a.double(), b.double()
    num = torch.linalg.vector_norm(a64 - b64).item()
    den = torch.linalg.vector_norm(b64).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def compare_outputs(a: dict, b: dict, tol: float, max_route_mismatch: float, forward_only: bool):
    """Compares output dicts a (candidate) and b (reference). Returns (ok, rows) where rows
    is a list of dicts for the table. Missing required tensors, shape mismatches, any
    non-finite value, rel L2 > tol, or routing mismatches above the allowed fraction fail.
    """
    rows, ok = [], True
    required = ("topk_ids",) + (FORWARD_TENSORS if forward_only else OUTPUT_TENSORS)
    token_mask = None  # rows (tokens) whose top-k expert sets agree
    for name in required + ("topk_weights",):
        ta, tb = a.get(name), b.get(name)
        row = {"tensor": name, "shape": None, "rel_l2": None, "max_abs": None, "nonfinite": "", "note": ""}
        if ta is None or tb is None:
            if name in required:
                row["status"] = "FAIL"
                row["note"] = "missing in " + " and ".join(s for s, t in (("a", ta), ("b", tb)) if t is None)
                ok = False
                rows.append(row)
            continue
        row["shape"] = list(tb.shape)
        if tuple(ta.shape) != tuple(tb.shape):
            row["status"], row["note"] = "FAIL", f"shape {list(ta.shape)} vs {list(tb.shape)}"
            ok = False
            rows.append(row)
            continue
        if name == "topk_ids":
            if ta.dtype.is_floating_point or tb.dtype.is_floating_point:
                row["status"], row["note"] = "FAIL", "topk_ids must be an integer array"
                ok = False
                rows.append(row)
                continue
            sa, _ = torch.sort(ta.long(), dim=1)
            sb, _ = torch.sort(tb.long(), dim=1)
            token_mask = (sa == sb).all(dim=1)
            n_set = int((~token_mask).sum().item())
            n_order = int(((ta.long() != tb.long()).any(dim=1) & token_mask).sum().item())
            frac = n_set / max(1, ta.shape[0])
            row["note"] = f"tokens routed differently: {n_set} ({100 * frac:.3f}%), slot order only: {n_order}"
            row["status"] = "ok" if frac <= max_route_mismatch else "FAIL"
            ok &= row["status"] == "ok"
            rows.append(row)
            continue
        na = int((~torch.isfinite(ta)).sum().item())
        nb = int((~torch.isfinite(tb)).sum().item())
        row["nonfinite"] = f"{na}/{nb}"
        fa, fb = ta.double(), tb.double()
        if name in ("y", "dx", "topk_weights") and token_mask is not None and not bool(token_mask.all()):
            fa, fb = fa[token_mask], fb[token_mask]
            row["note"] = f"{int((~token_mask).sum())} rerouted tokens excluded"
        if na or nb:
            row["status"] = "FAIL"
            ok = False
        else:
            row["rel_l2"] = rel_l2(fa, fb)
            row["max_abs"] = (fa - fb).abs().max().item() if fa.numel() else 0.0
            row["status"] = "ok" if row["rel_l2"] <= tol else "FAIL"
            ok &= row["status"] == "ok"
        rows.append(row)
    return ok, rows


def format_table(rows, tol) -> str:
    lines = [f"{'tensor':<13} {'shape':<20} {'rel_l2':>10} {'max_abs':>10} {'nonfinite':>9}  status  (tol {tol:g})"]
    for r in rows:
        rel = "-" if r["rel_l2"] is None else f"{r['rel_l2']:.3e}"
        mx = "-" if r["max_abs"] is None else f"{r['max_abs']:.3e}"
        shape = "-" if r["shape"] is None else str(r["shape"]).replace(" ", "")
        lines.append(
            f"{r['tensor']:<13} {shape:<20} {rel:>10} {mx:>10} {r['nonfinite'] or '-':>9}  {r['status']:<6}  {r['note']}"
        )
    return "\n".join(lines)


def load_outputs(d: str) -> dict:
    if not os.path.isdir(d):
        raise InteropError(f"{d}: no such directory")
    out = {}
    for name in OUTPUT_TENSORS + ("topk_ids", "topk_weights"):
        p = os.path.join(d, name + ".npy")
        if os.path.exists(p):
            out[name] = read_npy(p)
    return out


def cmd_compare(args) -> int:
    a, b = load_outputs(args.a), load_outputs(args.b)
    ok, rows = compare_outputs(a, b, args.tol, args.max_route_mismatch, args.forward_only)
    print(f"compare: a = {args.a}  b (reference) = {args.b}")
    print(format_table(rows, args.tol))
    print("PASS" if ok else "FAIL")
    if args.json:
        _write_json(args.json, {"ok": ok, "tol": args.tol, "a": args.a, "b": args.b, "rows": rows})
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------
# bench: a PyTorch + NCCL expert-parallel MoE layer as a user would write it
# --------------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single with split sizes; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        import torch.distributed as dist

        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        gi = g.new_empty((sum(ctx.in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(gi, g.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return gi, None, None, None


def _inverse_perm(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


class EPMoE:
    """Expert-parallel MoE layer (EP = world): router, permute, all-to-all-v, grouped GEMMs,
    all-to-all-v back, unpermute + weighted combine. Differentiable through autograd.
    """

    def __init__(self, shape, world, rank, group, wr, w0, w1, grouped_mm: bool):
        self.s, self.W, self.rank, self.group = shape, world, rank, group
        self.E, self.k = shape["experts"], shape["top_k"]
        self.L = self.E // world
        self.wr, self.w0, self.w1 = wr, w0, w1  # wr [E,H]; w0 [L,N0,H]; w1 [L,H,F]
        self.grouped_mm = grouped_mm
        self.last_remote_rows = 0

    def _expert_gemm(self, a, w, offs, counts_host):
        """[rows, K] x per-expert w[l] ([N, K]) → [rows, N], rows grouped by local expert."""
        if a.shape[0] == 0:
            return a.new_zeros((0, w.shape[1])) + 0 * w.sum()  # keeps w in the graph
        if self.grouped_mm:
            return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
        outs, start = [], 0
        for l, n in enumerate(counts_host):
            if n:
                outs.append(a[start : start + n] @ w[l].t())
            start += n
        return torch.cat(outs, 0)

    def forward(self, x, mark=lambda name: None):
        import torch.distributed as dist

        s, W, L, E, k = self.s, self.W, self.L, self.E, self.k
        M, H = x.shape
        # routing: f32 router (ARCHITECTURE.md), softmax, top-k, permutation by expert
        logits = F.linear(x.float(), self.wr.float())
        p = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(p, k, dim=-1)
        if s["renormalize"]:
            w = w / w.sum(dim=-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # send layout: (dest rank, local expert, token)
        x_send = x.index_select(0, order // k)
        counts = torch.bincount(flat, minlength=E)
        mark("routing")
        # dispatch: exchange per-expert counts, then the rows
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [W sources × L experts]
        send_split_dev = counts.view(W, L).sum(1)
        host = torch.cat([send_split_dev, recv_counts]).tolist()  # the one host sync
        send_splits = host[:W]
        rc_host = host[W:]
        recv_splits = [sum(rc_host[r * L : (r + 1) * L]) for r in range(W)]
        per_expert = [sum(rc_host[r * L + l] for r in range(W)) for l in range(L)]
        self.last_remote_rows = sum(send_splits) - send_splits[self.rank]
        x_recv = _AllToAll.apply(x_send, recv_splits, send_splits, self.group)
        # received (source, expert, token) → (expert, source, token) for the grouped GEMM
        rc = recv_counts.view(W, L)
        local_eid = torch.repeat_interleave(
            torch.arange(L, device=x.device).repeat(W), rc.reshape(-1), output_size=sum(recv_splits)
        )  # output_size known on the host: no second sync
        perm2 = torch.argsort(local_eid, stable=True)
        inv2 = _inverse_perm(perm2)
        x_e = x_recv.index_select(0, perm2)
        offs = torch.cumsum(rc.sum(0), 0).to(torch.int32)
        mark("dispatch")
        # experts
        h = self._expert_gemm(x_e, self.w0, offs, per_expert)
        if s["activation"] == "swiglu":
            a = F.silu(h[:, : s["ffn"]]) * h[:, s["ffn"] :]
        else:
            a = F.gelu(h, approximate="none")
        o = self._expert_gemm(a, self.w1, offs, per_expert)
        mark("experts")
        # combine: back to the source-major order, reverse all-to-all, unpermute, weighted sum
        o_src = o.index_select(0, inv2)
        o_back = _AllToAll.apply(o_src, send_splits, recv_splits, self.group)
        o_slots = o_back.index_select(0, _inverse_perm(order)).view(M, k, H)
        # Σ_j w[t,j]·o_j as one batched GEMM in the activation dtype (f32 accumulation)
        y = torch.bmm(w.to(x.dtype).unsqueeze(1), o_slots).squeeze(1)
        mark("combine")
        return y, ids


def _grouped_mm_works(device, dtype) -> tuple[bool, str]:
    """Whether torch._grouped_mm runs and matches a matmul loop here (bf16 only)."""
    if not hasattr(torch, "_grouped_mm"):
        return False, "torch._grouped_mm not in this torch"
    if dtype != torch.bfloat16:
        return False, "torch._grouped_mm needs bf16"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return False, "torch._grouped_mm bf16 fast path needs sm90+"
    try:
        g = torch.Generator(device=device).manual_seed(7)
        a = torch.randn((40, 64), generator=g, device=device).to(dtype)
        b = torch.randn((3, 32, 64), generator=g, device=device).to(dtype)
        offs = torch.tensor([5, 5, 40], dtype=torch.int32, device=device)
        got = torch._grouped_mm(a, b.transpose(-2, -1), offs=offs).float()
        want = torch.cat([a[:5] @ b[0].t(), a[5:40] @ b[2].t()]).float()
        if rel_l2(got, want) > 1e-2:
            return False, "torch._grouped_mm gave wrong results in the self-test"
    except Exception as e:  # any failure → use the loop, and say why
        return False, f"torch._grouped_mm failed: {type(e).__name__}: {e}"
    return True, "torch._grouped_mm"


class Timer:
    """Phase marks within one iteration: CUDA events on the current stream, or wall clock."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks = []

    def start(self):
        self.marks = []
        self.mark("start")

    def mark(self, name):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def elapsed(self):
        """{phase: ms} between consecutive marks, plus 'total' (first to last). Syncs."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            base = self.marks[0][1]
            t = [(n, base.elapsed_time(ev)) for n, ev in self.marks]
        else:
            base = self.marks[0][1]
            t = [(n, (v - base) * 1e3) for n, v in self.marks]
        out = {}
        for (_, t0), (n1, t1) in zip(t, t[1:]):
            out[n1] = t1 - t0
        out["total"] = t[-1][1] - t[0][1]
        return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense_gemm_tflops(device, n: int, dtype, iters: int = 20, warmup: int = 5) -> float:
    """Median rate of an n³ matmul in `dtype` (TFLOP/s)."""
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn((n, n), generator=g, device=device).to(dtype)
    b = torch.randn((n, n), generator=g, device=device).to(dtype)
    tm = Timer(device)
    times = []
    for i in range(warmup + iters):
        tm.start()
        torch.matmul(a, b)
        tm.mark("mm")
        ms = tm.elapsed()["total"]
        if i >= warmup:
            times.append(ms)
    return 2.0 * n**3 / (statistics.median(times) * 1e-3) / 1e12


def _seeded(shape, seed, device, scale, dtype):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _check_layer(layer, shape, M, device, dtype, seed, world, rank, group, tol, max_route_mismatch):
    """Runs the EP layer forward+backward on fresh inputs and compares, on rank 0, with the
    f32 single-device reference over the gathered inputs. Returns (ok, rows) on every rank.
    """
    import torch.distributed as dist

    H = shape["hidden"]
    x = _seeded((M, H), seed * 7919 + 1000 + rank, device, 1.0, dtype).requires_grad_()
    dy = _seeded((M, H), seed * 7919 + 2000 + rank, device, 1.0, dtype)
    for t in (layer.wr, layer.w0, layer.w1):
        t.grad = None
    y, ids = layer.forward(x)
    y.backward(dy)
    dwr = layer.wr.grad.float().clone()
    dist.all_reduce(dwr, group=group)  # router weight is replicated: global grad = Σ ranks

    def gather(t):
        t = t.detach().float().contiguous()
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t, group=group)
        return torch.cat(parts, 0)

    ids_all = gather(ids.to(torch.float32)).to(torch.int32)
    got = {
        "y": gather(y),
        "dx": gather(x.grad),
        "dw0": gather(layer.w0.grad),
        "dw1": gather(layer.w1.grad),
        "dwr": dwr,
        "topk_ids": ids_all,
    }
    inputs = {"x": gather(x), "dy": gather(dy), "w0": gather(layer.w0), "w1": gather(layer.w1)}
    ok_t = torch.zeros((1,), device=device)
    rows = []
    if rank == 0:
        arrays = dict(inputs, wr=layer.wr.detach().float())
        ref = run_reference(dict(shape), arrays, str(device), "f32", to_cpu=False)
        ok, rows = compare_outputs(got, ref, tol, max_route_mismatch, False)
        ok_t.fill_(1.0 if ok else 0.0)
        del ref
    dist.broadcast(ok_t, 0, group=group)
    for t in (layer.wr, layer.w0, layer.w1):
        t.grad = None
    return bool(ok_t.item() == 1.0), rows


def cmd_bench(args) -> int:
    import torch.distributed as dist

    shape = shape_from_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    validate_shape(shape, world)
    if args.tokens < 1:
        raise InteropError(f"--tokens = {args.tokens}: must be >= 1")
    if args.iters < 20:
        raise InteropError(f"--iters = {args.iters}: the bench rules ask for at least 20 timed iterations")
    if args.check_tokens < 1:
        raise InteropError(f"--check-tokens = {args.check_tokens}: must be >= 1")
    if args.pool < 1:
        raise InteropError(f"--pool = {args.pool}: must be >= 1")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise InteropError("--device cuda: no CUDA device visible (use --device cpu for the gloo path)")
        if local_rank >= torch.cuda.device_count():
            raise InteropError(f"LOCAL_RANK = {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    set_exact_f32()
    if "MASTER_ADDR" not in os.environ:  # plain `python` run: a world of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), WORLD_SIZE="1", RANK="0")
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=rank, world_size=world, **kw)
    group = dist.group.WORLD
    try:
        return _bench_body(args, shape, world, rank, device, dtype, group, backend)
    finally:
        dist.destroy_process_group()


def _barrier(device, group):
    import torch.distributed as dist

    t = torch.zeros((1,), device=device)
    dist.all_reduce(t, group=group)
    _sync(device)


def _bench_body(args, shape, world, rank, device, dtype, group, backend) -> int:
    import torch.distributed as dist

    H, Fd, E, k = shape["hidden"], shape["ffn"], shape["experts"], shape["top_k"]
    L = E // world
    N0 = n0_of(shape)
    M = args.tokens
    use_gmm, gemm_impl = (False, "disabled by --no-grouped-mm") if args.no_grouped_mm else _grouped_mm_works(device, dtype)
    if not use_gmm:
        gemm_impl = f"loop of torch.matmul per expert ({gemm_impl})"

    # Weights: wr replicated (same seed everywhere), expert e seeded by its global id.
    wr = _seeded((E, H), args.seed * 7919 + 1, device, 1.0 / math.sqrt(H), dtype).requires_grad_()
    w0 = torch.empty((L, N0, H), device=device, dtype=dtype)
    w1 = torch.empty((L, H, Fd), device=device, dtype=dtype)
    for l in range(L):
        e = rank * L + l
        w0[l] = _seeded((N0, H), args.seed * 7919 + 10_000 + e, device, 1.0 / math.sqrt(H), dtype)
        w1[l] = _seeded((H, Fd), args.seed * 7919 + 20_000 + e, device, 1.0 / math.sqrt(Fd), dtype)
    w0.requires_grad_()
    w1.requires_grad_()
    layer = EPMoE(shape, world, rank, group, wr, w0, w1, use_gmm)

    record = {
        "impl": "torch",
        "preset": args.preset,
        "tokens_per_rank": M,
        "world": world,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "grouped_mm": use_gmm,
        "expert_gemm": gemm_impl,
        "backend": backend,
        "dtype": args.dtype,
        "shape": dict(shape),
        "iters": args.iters,
        "warmup": args.warmup,
        "input_pool": args.pool,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "env": {k: os.environ.get(k) for k in _MULTICAST_OFF},
    }

    # Correctness first: EP layer vs the f32 reference on gathered inputs.
    if args.check or args.check_only:
        if device.type == "cuda":
            # Rank 0 holds every expert in f32 several times (gathered weights and grads, the
            # reference's grads, f64 temporaries of the comparison): refuse before an OOM.
            need = 5 * 4 * E * (N0 * H + H * Fd) + 64 * args.check_tokens * world * (H + N0) * k
            total = torch.cuda.get_device_properties(device).total_memory
            if need > 0.8 * total:
                raise InteropError(
                    f"--check on this shape needs ~{need / 2**30:.0f} GiB on rank 0, over 80% of the GPU's "
                    f"{total / 2**30:.0f} GiB: check a reduced expert count instead (e.g. --check-only --experts "
                    f"{max(world, 32 // world * world)})"
                )
        ok, rows = _check_layer(
            layer, shape, args.check_tokens, device, dtype, args.seed, world, rank, group, args.tol, 1e-3
        )
        if rank == 0:
            print(f"check: EP layer ({gemm_impl}) vs f32 reference, {args.check_tokens} tokens/rank:")
            print(format_table(rows, args.tol))
            print("check PASS" if ok else "check FAIL")
        record["check"] = {"ok": ok, "tokens_per_rank": args.check_tokens, "tol": args.tol, "rows": rows}
        if not ok or args.check_only:
            if rank == 0 and args.json:
                _write_json(args.json, record)
            return 0 if ok else 1

    # Dense GEMM rate on every rank, same run.
    dense_n = args.dense_n if args.dense_n else (8192 if device.type == "cuda" else 512)
    dense = dense_gemm_tflops(device, dense_n, dtype)

    xs = [_seeded((M, H), args.seed * 7919 + 30_000 + 100 * rank + i, device, 1.0, dtype) for i in range(args.pool)]
    dys = [_seeded((M, H), args.seed * 7919 + 40_000 + 100 * rank + i, device, 1.0, dtype) for i in range(args.pool)]

    tm = Timer(device)
    fwd, remote_rows = [], []
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            x = xs[i % args.pool]
            _barrier(device, group)
            tm.start()
            layer.forward(x, tm.mark)
            t = tm.elapsed()
            if i >= args.warmup:
                fwd.append(t)
                remote_rows.append(layer.last_remote_rows)
    train = []
    if args.backward:
        xg = [x.clone().requires_grad_() for x in xs]
        for i in range(args.warmup + args.iters):
            x = xg[i % args.pool]
            for p in (x, wr, w0, w1):
                p.grad = None
            _barrier(device, group)
            tm.start()
            y, _ = layer.forward(x, tm.mark)
            tm.mark("forward")
            y.backward(dys[i % args.pool])
            tm.mark("backward")
            t = tm.elapsed()
            if i >= args.warmup:
                train.append(t)

    def med(samples, key):
        return statistics.median(s[key] for s in samples)

    mine = {
        "rank": rank,
        "forward_ms": med(fwd, "total"),
        "phases": {ph: med(fwd, ph) for ph in PHASES},
        "dense_tflops": dense,
        "remote_rows": statistics.mean(remote_rows),
    }
    if args.backward:
        mine["fwd_bwd_ms"] = med(train, "total")
        mine["backward_ms"] = med(train, "backward")
        mine["phases_train"] = {ph: med(train, ph) for ph in PHASES}
    per_rank = [None] * world
    dist.all_gather_object(per_rank, mine, group=group)
    if rank != 0:
        return 0

    elem = torch.tensor([], dtype=dtype).element_size()
    flops_fwd = 2.0 * M * k * H * (N0 + Fd)  # expert GEMMs per rank (mean over ranks)
    dense_mean = statistics.mean(r["dense_tflops"] for r in per_rank)
    fwd_ms = max(r["forward_ms"] for r in per_rank)
    phases = {ph: statistics.mean(r["phases"][ph] for r in per_rank) for ph in PHASES}
    remote_bytes = statistics.mean(r["remote_rows"] for r in per_rank) * H * elem
    record.update(
        forward_ms=fwd_ms,
        phases=phases,
        tflops=flops_fwd / (fwd_ms * 1e-3) / 1e12,
        expert_flops_fwd=flops_fwd,
        dense_tflops=dense_mean,
        dense_n=dense_n,
        ratio_to_floor=(flops_fwd / (dense_mean * 1e12)) / (fwd_ms * 1e-3),
        comm={
            "remote_bytes": remote_bytes,
            "dispatch_gbps": remote_bytes / (phases["dispatch"] * 1e-3) / 1e9,
            "combine_gbps": remote_bytes / (phases["combine"] * 1e-3) / 1e9,
        },
        per_rank=per_rank,
    )
    if args.backward:
        fb = max(r["fwd_bwd_ms"] for r in per_rank)
        record.update(
            backward_ms=max(r["backward_ms"] for r in per_rank),
            fwd_bwd_ms=fb,
            phases_train={ph: statistics.mean(r["phases_train"][ph] for r in per_rank) for ph in PHASES},
            tflops_fwd_bwd=3 * flops_fwd / (fb * 1e-3) / 1e12,
            ratio_to_floor_fwd_bwd=(3 * flops_fwd / (dense_mean * 1e12)) / (fb * 1e-3),
        )
    ph = "  ".join(f"{p} {phases[p]:.3f}" for p in PHASES)
    line = (
        f"torch {args.preset} W={world} M={M} [{gemm_impl}] forward {fwd_ms:.3f} ms ({ph}) "
        f"{record['tflops']:.4g} TFLOP/s, ratio to floor {record['ratio_to_floor']:.3f} "
        f"(dense {dense_mean:.4g} TFLOP/s), dispatch {record['comm']['dispatch_gbps']:.4g} GB/s"
    )
    if args.backward:
        line += f"; fwd+bwd {record['fwd_bwd_ms']:.3f} ms (backward {record['backward_ms']:.3f} ms)"
    print(line)
    if args.json:
        _write_json(args.json, record)
    return 0


def _json_safe(v):
    """Strict JSON: non-finite floats become the strings "inf" / "-inf" / "nan"."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _write_json(path, record):
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_json_safe(record), f, indent=2, allow_nan=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("gen", help="write a seeded input directory")
    g.add_argument("--out", required=True)
    add_shape_args(g)
    g.add_argument("--tokens", type=int, required=True, help="tokens per rank (M)")
    g.add_argument("--world", type=int, default=2, help="expert-parallel ranks (W)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--route",
        choices=("uniform", "one-rank", "sparse"),
        default="uniform",
        help="uniform: random router; one-rank: every slot goes to rank 0's experts; "
        "sparse: only even expert ids are chosen (odd experts empty)",
    )
    g.add_argument("--zero-tokens", type=int, default=0, help="first N tokens of every rank are zero (exact routing ties)")
    g.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the random numbers are drawn (cuda is much faster for GB-sized layers; "
        "the values differ from cpu's for the same seed)",
    )
    g.set_defaults(func=cmd_gen)

    r = sub.add_parser("ref", help="compute outputs for an input directory")
    r.add_argument("--inputs", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    r.set_defaults(func=cmd_ref)

    c = sub.add_parser("compare", help="compare two output directories (b is the reference)")
    c.add_argument("--a", required=True)
    c.add_argument("--b", required=True)
    c.add_argument("--tol", type=float, default=1e-2)
    c.add_argument("--max-route-mismatch", type=float, default=1e-3, help="allowed fraction of rerouted tokens")
    c.add_argument("--forward-only", action="store_true", help="require only topk_ids and y")
    c.add_argument("--json", help="also write the table as JSON")
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("bench", help="time a PyTorch EP MoE layer (launch with torchrun)")
    add_shape_args(b)
    b.add_argument("--tokens", type=int, default=8192, help="tokens per rank (M)")
    b.add_argument("--backward", action="store_true", help="also time forward + backward")
    b.add_argument("--iters", type=int, default=20)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--pool", type=int, default=4, help="distinct inputs rotated across iterations")
    b.add_argument("--json", help="write the record here (rank 0)")
    b.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo backend, for testing")
    b.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--dense-n", type=int, default=0, help="dense GEMM size (default 8192 on cuda, 512 on cpu)")
    b.add_argument("--no-grouped-mm", action="store_true", help="force the per-expert matmul loop")
    b.add_argument("--check", action="store_true", help="first verify the EP layer against the f32 reference")
    b.add_argument("--check-only", action="store_true", help="verify (as --check) and stop before timing")
    b.add_argument("--check-tokens", type=int, default=256, help="tokens per rank for --check")
    b.add_argument("--tol", type=float, default=1e-2, help="rel L2 tolerance for --check")
    b.add_argument("--port", type=int, default=29517, help="rendezvous port for a plain (non-torchrun) run")
    b.set_defaults(func=cmd_bench)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InteropError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
