#!/usr/bin/env python3
"""Tests for bench/torch_reference.py, runnable with plain python (needs torch + numpy):

    python bench/torch/test_torch_reference.py            # all tests, incl. 2-rank gloo bench
    python bench/torch/test_torch_reference.py -k compare # a subset (unittest -k)

The layer is re-derived here independently in numpy float64 (per-token loops straight from
ARCHITECTURE.md, hand-written backward checked by finite differences) and the script's
`ref` output is compared against it. The distributed `bench` path runs under torchrun with
the gloo backend on the CPU, with its built-in check against the reference.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "torch_reference.py")

_spec = importlib.util.spec_from_file_location("torch_reference", SCRIPT)
tr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tr)
import torch  # noqa: E402  (after the module set the multicast-off guard)

ERF = np.vectorize(math.erf)


def run(*args, check=True):
    """Runs the script in a subprocess; returns CompletedProcess."""
    p = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


# ---------------------------------------------------------------------------------------------
# Independent float64 numpy implementation
# ---------------------------------------------------------------------------------------------


def np_layer(cfg, x, wr, w0, w1, dy):
    """Forward and backward of the layer in float64, one token and slot at a time."""
    x, wr, w0, w1, dy = (np.asarray(a, dtype=np.float64) for a in (x, wr, w0, w1, dy))
    T, H = x.shape
    E, k, Fd = cfg["experts"], cfg["top_k"], cfg["ffn"]
    swiglu = cfg["activation"] == "swiglu"
    y = np.zeros((T, H))
    dx = np.zeros_like(x)
    dwr = np.zeros_like(wr)
    dw0 = np.zeros_like(w0)
    dw1 = np.zeros_like(w1)
    ids = np.zeros((T, k), dtype=np.int64)
    wts = np.zeros((T, k))
    for t in range(T):
        logits = wr @ x[t]
        e_ = np.exp(logits - logits.max())
        p = e_ / e_.sum()
        # k largest p, ties to the lower id: sort by (-p, id)
        order = sorted(range(E), key=lambda e: (-p[e], e))
        sel = order[:k]
        q = p[sel]
        S = q.sum()
        w = q / S if cfg["renormalize"] else q
        ids[t], wts[t] = sel, w
        dw = np.zeros(k)
        for j, e in enumerate(sel):
            h = w0[e] @ x[t]
            if swiglu:
                g, u = h[:Fd], h[Fd:]
                sg = 1.0 / (1.0 + np.exp(-g))
                a = g * sg * u
            else:
                Phi = 0.5 * (1.0 + ERF(h / math.sqrt(2.0)))
                a = h * Phi
            o = w1[e] @ a
            y[t] += w[j] * o
            # backward of this slot
            dw[j] = dy[t] @ o
            do = w[j] * dy[t]
            dw1[e] += np.outer(do, a)
            da = w1[e].T @ do
            if swiglu:
                dsilu = sg * (1.0 + g * (1.0 - sg))
                dh = np.concatenate([da * u * dsilu, da * g * sg])
            else:
                phi = np.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
                dh = da * (Phi + h * phi)
            dw0[e] += np.outer(dh, x[t])
            dx[t] += w0[e].T @ dh
        dq = (dw - (dw * w).sum()) / S if cfg["renormalize"] else dw
        dp = np.zeros(E)
        dp[sel] = dq
        dlogits = p * (dp - dp @ p)
        dwr += np.outer(dlogits, x[t])
        dx[t] += wr.T @ dlogits
    return {"y": y, "dx": dx, "dwr": dwr, "dw0": dw0, "dw1": dw1, "topk_ids": ids, "topk_weights": wts}


def np_bf16(a):
    """Round-to-nearest-even to bf16 by bit manipulation (finite inputs), as float32."""
    u = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def load_dir(d, names):
    return {n: np.load(os.path.join(d, n + ".npy")) for n in names}


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


class NumpyReferenceSelfCheck(unittest.TestCase):
    """The numpy backward is itself checked by central finite differences of Σ y·dy."""

    def _fd(self, cfg, seed):
        rng = np.random.default_rng(seed)
        T, H, E, Fd = 6, 8, cfg["experts"], cfg["ffn"]
        n0 = 2 * Fd if cfg["activation"] == "swiglu" else Fd
        P = {
            "x": rng.standard_normal((T, H)),
            "wr": rng.standard_normal((E, H)) / math.sqrt(H),
            "w0": rng.standard_normal((E, n0, H)) / math.sqrt(H),
            "w1": rng.standard_normal((E, H, Fd)) / math.sqrt(Fd),
        }
        dy = rng.standard_normal((T, H))
        base = np_layer(cfg, P["x"], P["wr"], P["w0"], P["w1"], dy)
        grads = {"x": base["dx"], "wr": base["dwr"], "w0": base["dw0"], "w1": base["dw1"]}
        eps = 1e-6
        for name in P:
            V = rng.standard_normal(P[name].shape)

            def loss(sign):
                Q = dict(P)
                Q[name] = P[name] + sign * eps * V
                out = np_layer(cfg, Q["x"], Q["wr"], Q["w0"], Q["w1"], dy)
                np.testing.assert_array_equal(out["topk_ids"], base["topk_ids"])  # no route flip
                return float((out["y"] * dy).sum())

            fd = (loss(1) - loss(-1)) / (2 * eps)
            an = float((grads[name] * V).sum())
            self.assertLess(abs(fd - an), 1e-6 * max(1.0, abs(an)), f"{name}: fd {fd} vs analytic {an}")

    def test_fd_swiglu_renormalized(self):
        self._fd(dict(experts=5, top_k=2, ffn=6, activation="swiglu", renormalize=True), 1)

    def test_fd_gelu_plain(self):
        self._fd(dict(experts=4, top_k=3, ffn=5, activation="gelu", renormalize=False), 2)


class NpyCodec(unittest.TestCase):
    def test_roundtrip_with_numpy(self):
        with tempfile.TemporaryDirectory() as d:
            cases = [
                np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5,
                np.array([1, -2, 3], dtype=np.int32),
                np.zeros((0, 5), dtype=np.float32),
                np.array(3.25, dtype=np.float32),
                np.arange(6, dtype=np.int64).reshape(3, 2),
                np.linspace(-1, 1, 10, dtype=np.float64),
            ]
            for i, a in enumerate(cases):
                p = os.path.join(d, f"np{i}.npy")
                np.save(p, a)
                t = tr.read_npy(p)
                self.assertEqual(tuple(t.shape), a.shape)
                np.testing.assert_array_equal(t.numpy(), a)
                q = os.path.join(d, f"tr{i}.npy")
                tr.write_npy(q, torch.from_numpy(a.copy()), torch.from_numpy(a.copy()).dtype)
                b = np.load(q)
                self.assertEqual(b.dtype, a.dtype)
                np.testing.assert_array_equal(b, a)

    def test_rejects_bad_files(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "f.npy")
            np.save(p, np.asfortranarray(np.ones((3, 2), np.float32)))
            with self.assertRaisesRegex(tr.InteropError, "Fortran"):
                tr.read_npy(p)
            np.save(p, np.ones(3, np.float16))
            with self.assertRaisesRegex(tr.InteropError, "dtype '<f2' not supported"):
                tr.read_npy(p)
            np.save(p, np.ones(100, np.float32))
            with open(p, "r+b") as f:
                f.truncate(os.path.getsize(p) - 4)
            with self.assertRaisesRegex(tr.InteropError, "truncated"):
                tr.read_npy(p)
            with open(p, "wb") as f:
                f.write(b"not an npy file")
            with self.assertRaisesRegex(tr.InteropError, "bad magic"):
                tr.read_npy(p)


class Bf16Rounding(unittest.TestCase):
    def test_matches_bit_rne(self):
        rng = np.random.default_rng(3)
        a = (rng.standard_normal(100_000) * 10.0 ** rng.integers(-20, 20, 100_000)).astype(np.float32)
        # exact ties (lower 16 bits 0x8000) with both parities of bit 16
        ties = (np.arange(1000, dtype=np.uint32) << 16 | 0x8000).view(np.float32) + 0
        a = np.concatenate([a, ties, -ties])
        got = tr.bf16_round(torch.from_numpy(a)).numpy()
        np.testing.assert_array_equal(got, np_bf16(a))


CONFIGS = {
    "swiglu_renorm_zero_ties": dict(
        args=["--preset", "custom", "--hidden", "48", "--ffn", "40", "--experts", "8", "--top-k", "2",
              "--renormalize", "--tokens", "24", "--world", "2", "--zero-tokens", "3", "--seed", "11"],
    ),
    "gelu_plain_w3": dict(
        args=["--preset", "custom", "--hidden", "32", "--ffn", "24", "--experts", "6", "--top-k", "3",
              "--activation", "gelu", "--tokens", "16", "--world", "3", "--seed", "12"],
    ),
    "one_rank": dict(
        args=["--preset", "custom", "--hidden", "32", "--ffn", "16", "--experts", "8", "--top-k", "2",
              "--tokens", "16", "--world", "2", "--route", "one-rank", "--seed", "13"],
    ),
    "sparse_k4": dict(
        args=["--preset", "custom", "--hidden", "32", "--ffn", "16", "--experts", "16", "--top-k", "4",
              "--renormalize", "--tokens", "12", "--world", "4", "--route", "sparse", "--seed", "14"],
    ),
}


class GenRefAgainstNumpy(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dirs = {}
        for name, c in CONFIGS.items():
            base = os.path.join(cls.tmp.name, name)
            run("gen", "--out", base + "/in", *c["args"])
            run("ref", "--inputs", base + "/in", "--out", base + "/f32")
            run("ref", "--inputs", base + "/in", "--out", base + "/bf16", "--dtype", "bf16")
            cls.dirs[name] = base

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def _inputs(self, name):
        base = self.dirs[name]
        with open(base + "/in/config.json") as f:
            cfg = json.load(f)
        return cfg, load_dir(base + "/in", tr.INPUT_FILES)

    def test_inputs_follow_contract(self):
        for name in CONFIGS:
            cfg, a = self._inputs(name)
            T, H, E, Fd = cfg["world"] * cfg["tokens_per_rank"], cfg["hidden"], cfg["experts"], cfg["ffn"]
            n0 = 2 * Fd if cfg["activation"] == "swiglu" else Fd
            want = {"x": (T, H), "wr": (E, H), "w0": (E, n0, H), "w1": (E, H, Fd), "dy": (T, H)}
            for n, shp in want.items():
                self.assertEqual(a[n].shape, shp, f"{name}/{n}")
                self.assertEqual(a[n].dtype, np.float32)
                self.assertTrue(a[n].flags.c_contiguous)
                np.testing.assert_array_equal(np_bf16(a[n]), a[n], f"{name}/{n} not bf16-exact")
                self.assertTrue(np.isfinite(a[n]).all())
            # scales: O(1) activations
            self.assertLess(abs(a["x"][cfg["zero_tokens"]:].std() - 1.0), 0.35 if cfg["route"] != "uniform" else 0.1)
            self.assertLess(abs(a["w0"].std() * math.sqrt(H) - 1.0), 0.1)
            self.assertLess(abs(a["w1"].std() * math.sqrt(Fd) - 1.0), 0.1)

    def test_same_seed_same_files(self):
        with tempfile.TemporaryDirectory() as d:
            run("gen", "--out", d, *CONFIGS["gelu_plain_w3"]["args"])
            _, a = self._inputs("gelu_plain_w3")
            b = load_dir(d, tr.INPUT_FILES)
            for n in tr.INPUT_FILES:
                np.testing.assert_array_equal(a[n], b[n])

    def test_ref_f32_matches_numpy_f64(self):
        for name in CONFIGS:
            cfg, a = self._inputs(name)
            want = np_layer(cfg, a["x"], a["wr"], a["w0"], a["w1"], a["dy"])
            got = load_dir(self.dirs[name] + "/f32", tr.OUTPUT_TENSORS + ("topk_ids", "topk_weights"))
            self.assertEqual(got["topk_ids"].dtype, np.int32)
            np.testing.assert_array_equal(got["topk_ids"], want["topk_ids"], f"{name}: routing")
            for n in tr.OUTPUT_TENSORS + ("topk_weights",):
                self.assertEqual(got[n].dtype, np.float32)
                self.assertEqual(got[n].shape, want[n].shape, f"{name}/{n}")
                self.assertLess(rel(got[n], want[n]), 2e-6, f"{name}/{n}")

    def test_ref_bf16_within_tolerance_of_numpy(self):
        for name in CONFIGS:
            cfg, a = self._inputs(name)
            want = np_layer(cfg, a["x"], a["wr"], a["w0"], a["w1"], a["dy"])
            got = load_dir(self.dirs[name] + "/bf16", tr.OUTPUT_TENSORS + ("topk_ids",))
            np.testing.assert_array_equal(got["topk_ids"], want["topk_ids"], f"{name}: routing")
            for n in tr.OUTPUT_TENSORS:
                r = rel(got[n], want[n])
                self.assertLess(r, 1e-2, f"{name}/{n}")
                self.assertGreater(r, 0.0, f"{name}/{n}: bf16 path identical to f64?")

    def test_tie_rule_on_zero_tokens(self):
        cfg, a = self._inputs("swiglu_renorm_zero_ties")
        ids = np.load(self.dirs["swiglu_renorm_zero_ties"] + "/f32/topk_ids.npy")
        w = np.load(self.dirs["swiglu_renorm_zero_ties"] + "/f32/topk_weights.npy")
        M, z, k = cfg["tokens_per_rank"], cfg["zero_tokens"], cfg["top_k"]
        for r in range(cfg["world"]):
            rows = slice(r * M, r * M + z)
            self.assertTrue((a["x"][rows] == 0).all())
            np.testing.assert_array_equal(ids[rows], np.tile(np.arange(k), (z, 1)))
            np.testing.assert_allclose(w[rows], 1.0 / k, rtol=1e-6)  # renormalised uniform

    def test_tie_rule_unit(self):
        p = torch.tensor([[0.1, 0.3, 0.3, 0.0, 0.3], [0.25, 0.25, 0.25, 0.25, 0.0]])
        ids = tr.topk_lower_id(p, 3)
        self.assertEqual(ids.tolist(), [[1, 2, 4], [0, 1, 2]])

    def test_route_modes(self):
        cfg, _ = self._inputs("one_rank")
        ids = np.load(self.dirs["one_rank"] + "/f32/topk_ids.npy")
        L = cfg["experts"] // cfg["world"]
        self.assertTrue((ids < L).all(), "one-rank: every slot on rank 0's experts")
        self.assertEqual(len(np.unique(ids)), L)
        cfg, _ = self._inputs("sparse_k4")
        ids = np.load(self.dirs["sparse_k4"] + "/f32/topk_ids.npy")
        self.assertTrue((ids % 2 == 0).all(), "sparse: odd experts empty")
        dw0 = np.load(self.dirs["sparse_k4"] + "/f32/dw0.npy")
        self.assertTrue((dw0[1::2] == 0).all() and (np.abs(dw0[0::2]).sum(axis=(1, 2)) > 0).all())

    def test_compare_self_and_bf16(self):
        base = self.dirs["swiglu_renorm_zero_ties"]
        p = run("compare", "--a", base + "/f32", "--b", base + "/f32")
        self.assertIn("PASS", p.stdout)
        p = run("compare", "--a", base + "/bf16", "--b", base + "/f32")
        self.assertIn("PASS", p.stdout)
        js = os.path.join(self.tmp.name, "cmp.json")
        p = run("compare", "--a", base + "/bf16", "--b", base + "/f32", "--tol", "1e-4", "--json", js, check=False)
        self.assertEqual(p.returncode, 1, p.stdout)
        self.assertIn("FAIL", p.stdout)

        def no_constants(c):
            raise AssertionError(f"non-standard JSON constant {c}")

        with open(js) as f:
            rec = json.load(f, parse_constant=no_constants)
        self.assertFalse(rec["ok"])
        self.assertEqual({r["tensor"]: r["status"] for r in rec["rows"]}["y"], "FAIL")

    def test_compare_detects_faults(self):
        src = self.dirs["gelu_plain_w3"] + "/f32"
        names = tr.OUTPUT_TENSORS + ("topk_ids", "topk_weights")
        good = load_dir(src, names)

        def variant(mutate):
            d = tempfile.mkdtemp(dir=self.tmp.name)
            arrays = {n: v.copy() for n, v in good.items()}
            mutate(arrays)
            for n, v in arrays.items():
                np.save(os.path.join(d, n + ".npy"), v)  # written by numpy, as a Rust side would
            return run("compare", "--a", d, "--b", src, check=False), d

        p, _ = variant(lambda a: None)
        self.assertEqual(p.returncode, 0, p.stdout)

        def scale_dw1(a):
            a["dw1"] *= 1.02

        p, _ = variant(scale_dw1)
        self.assertEqual(p.returncode, 1)
        self.assertRegex(p.stdout, r"dw1 .* FAIL")

        def nan_dx(a):
            a["dx"][3, 5] = np.nan

        p, _ = variant(nan_dx)
        self.assertEqual(p.returncode, 1)
        self.assertRegex(p.stdout, r"dx .* 1/0 +FAIL")

        def drop_dwr(a):
            del a["dwr"]

        p, d = variant(drop_dwr)
        self.assertEqual(p.returncode, 1)
        self.assertIn("missing in a", p.stdout)
        p = run("compare", "--a", d, "--b", src, "--forward-only")
        self.assertIn("PASS", p.stdout)

        def reroute(a):
            ids = a["topk_ids"]
            ids[0] = (ids[0] + 1) % 6  # a different expert set for token 0

        p, _ = variant(reroute)
        self.assertEqual(p.returncode, 1, "1 of 48 tokens rerouted exceeds 0.1%")
        self.assertIn("tokens routed differently: 1", p.stdout)

        def swap_order(a):
            a["topk_ids"][1] = a["topk_ids"][1][::-1].copy()

        p, _ = variant(swap_order)
        self.assertEqual(p.returncode, 0, p.stdout)
        self.assertIn("slot order only: 1", p.stdout)

        def wrong_shape(a):
            a["dw0"] = a["dw0"][:, :-1]

        p, _ = variant(wrong_shape)
        self.assertEqual(p.returncode, 1)
        self.assertIn("shape", p.stdout)

    def test_rerouted_tokens_are_masked(self):
        """A tolerated reroute excludes that token's rows from y/dx instead of failing them."""
        src = self.dirs["gelu_plain_w3"] + "/f32"
        names = tr.OUTPUT_TENSORS + ("topk_ids", "topk_weights")
        a = {n: torch.from_numpy(v) for n, v in load_dir(src, names).items()}
        b = {n: v.clone() for n, v in a.items()}
        b["topk_ids"][2] = (b["topk_ids"][2] + 1) % 6
        b["y"][2] += 100.0
        ok, rows = tr.compare_outputs(a, b, 1e-2, 0.05, False)
        self.assertTrue(ok, rows)
        ok, _ = tr.compare_outputs(a, b, 1e-2, 0.0, False)
        self.assertFalse(ok)


class Presets(unittest.TestCase):
    def test_aliases_and_table(self):
        for name, canon in [("mixtral", "mixtral-8x7b"), ("Mixtral-8x7B", "mixtral-8x7b"),
                            ("qwen2-moe", "qwen2-moe-2.7b"), ("phi3.5-moe", "phi-3.5-moe"),
                            ("phi-3.5-moe", "phi-3.5-moe"), ("deepseek-v3", "deepseek-v3"), ("DSV3", "deepseek-v3")]:
            self.assertEqual(tr.canonical_preset(name), canon)
        with self.assertRaisesRegex(tr.InteropError, "preset 'llama' unknown"):
            tr.canonical_preset("llama")
        shapes = {n: (p["hidden"], p["ffn"], p["experts"], p["top_k"], p["renormalize"]) for n, p in tr.PRESETS.items()}
        self.assertEqual(shapes, {
            "mixtral-8x7b": (4096, 14336, 8, 2, True),
            "qwen2-moe-2.7b": (2048, 1408, 64, 4, False),
            "phi-3.5-moe": (4096, 6400, 16, 2, True),
            "deepseek-v3": (7168, 2048, 256, 8, True),
        })

    def test_gen_preset_with_overrides(self):
        with tempfile.TemporaryDirectory() as d:
            run("gen", "--out", d, "--preset", "mixtral", "--hidden", "32", "--ffn", "16", "--tokens", "4")
            with open(d + "/config.json") as f:
                cfg = json.load(f)
            self.assertEqual(cfg["preset"], "mixtral-8x7b")
            self.assertEqual((cfg["hidden"], cfg["ffn"], cfg["experts"], cfg["top_k"]), (32, 16, 8, 2))
            self.assertTrue(cfg["renormalize"])
            self.assertEqual((cfg["world"], cfg["dtype"], cfg["activation"]), (2, "bf16", "swiglu"))
            self.assertEqual(np.load(d + "/w0.npy").shape, (8, 32, 32))


class BadInput(unittest.TestCase):
    def test_gen_rejects(self):
        with tempfile.TemporaryDirectory() as d:
            cases = [
                (["--experts", "6", "--world", "4"], "experts = 6 is not divisible by world = 4"),
                (["--experts", "4", "--top-k", "5", "--world", "2"], "top_k = 5 exceeds experts = 4"),
                (["--experts", "8", "--top-k", "3", "--world", "4", "--route", "one-rank"], "experts/world = 2 >= top_k = 3"),
                (["--experts", "8", "--world", "2", "--hidden", "0"], "hidden = 0"),
                (["--experts", "8", "--world", "2", "--route", "sparse", "--zero-tokens", "1"], "use one or the other"),
            ]
            for extra, msg in cases:
                args = ["gen", "--out", d, "--preset", "custom", "--hidden", "16", "--ffn", "8", "--top-k", "2",
                        "--tokens", "4"] + extra
                p = run(*args, check=False)
                self.assertEqual(p.returncode, 2, p.stderr)
                self.assertIn(msg, p.stderr)
            if not torch.cuda.is_available():
                p = run("gen", "--out", d, "--preset", "mixtral", "--hidden", "16", "--ffn", "8", "--tokens", "4",
                        "--device", "cuda", check=False)
                self.assertEqual(p.returncode, 2)
                self.assertIn("no CUDA device", p.stderr)
            p = run("gen", "--out", d, "--preset", "custom", "--hidden", "16", "--tokens", "4", check=False)
            self.assertEqual(p.returncode, 2)
            self.assertIn("--ffn --experts --top-k", p.stderr)

    def test_ref_rejects(self):
        with tempfile.TemporaryDirectory() as d:
            run("gen", "--out", d, "--preset", "custom", "--hidden", "16", "--ffn", "8", "--experts", "4",
                "--top-k", "2", "--tokens", "4", "--world", "2")
            x = np.load(d + "/x.npy")
            np.save(d + "/x.npy", x + np.float32(1e-3))
            p = run("ref", "--inputs", d, "--out", d + "/o", check=False)
            self.assertEqual(p.returncode, 2)
            self.assertIn("x.npy", p.stderr)
            self.assertIn("not bf16-representable", p.stderr)
            np.save(d + "/x.npy", x[:-1])
            p = run("ref", "--inputs", d, "--out", d + "/o", check=False)
            self.assertIn("x.npy: shape [7, 16], expected [8, 16]", p.stderr)
            x[0, 0] = np.inf
            np.save(d + "/x.npy", x)
            p = run("ref", "--inputs", d, "--out", d + "/o", check=False)
            self.assertIn("x.npy: 1 non-finite values", p.stderr)
            np.save(d + "/x.npy", x.astype(np.float64))
            p = run("ref", "--inputs", d, "--out", d + "/o", check=False)
            self.assertIn("expected float32", p.stderr)
            with open(d + "/config.json") as f:
                cfg = json.load(f)
            cfg["activation"] = "relu"
            with open(d + "/config.json", "w") as f:
                json.dump(cfg, f)
            p = run("ref", "--inputs", d, "--out", d + "/o", check=False)
            self.assertEqual(p.returncode, 2)
            self.assertIn("activation = 'relu'", p.stderr)


def torchrun(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", SCRIPT, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


class BenchGloo(unittest.TestCase):
    """The expert-parallel bench layer on 2 CPU ranks (gloo), checked against the reference."""

    def _bench(self, nproc, extra, backward=True):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "r.json")
            args = ["bench", "--device", "cpu", "--check", "--check-tokens", "24", "--tokens", "32",
                    "--dense-n", "128", "--json", out] + (["--backward"] if backward else []) + extra
            p = torchrun(nproc, *args)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            self.assertIn("check PASS", p.stdout)
            with open(out) as f:
                return json.load(f), p.stdout

    def _common(self, rec, world, backward):
        for key in ("impl", "preset", "tokens_per_rank", "world", "gpu", "forward_ms", "phases", "tflops",
                    "torch_version", "grouped_mm", "ratio_to_floor", "dense_tflops", "comm"):
            self.assertIn(key, rec)
        self.assertEqual(rec["impl"], "torch")
        self.assertEqual(rec["world"], world)
        self.assertEqual(set(rec["phases"]), set(tr.PHASES))
        self.assertTrue(all(v > 0 for v in rec["phases"].values()))
        self.assertLessEqual(sum(rec["phases"].values()), rec["forward_ms"] * 1.5)
        self.assertGreater(rec["tflops"], 0)
        self.assertTrue(rec["check"]["ok"])
        self.assertEqual(len(rec["per_rank"]), world)
        self.assertEqual(rec["env"]["NCCL_NVLS_ENABLE"], "0")
        if backward:
            self.assertGreater(rec["backward_ms"], 0)
            self.assertGreater(rec["fwd_bwd_ms"], rec["backward_ms"])
        else:
            self.assertNotIn("backward_ms", rec)

    def test_two_ranks_swiglu_grouped_mm(self):
        rec, _ = self._bench(2, ["--preset", "custom", "--hidden", "64", "--ffn", "48", "--experts", "8",
                                 "--top-k", "2", "--renormalize"])
        self._common(rec, 2, True)
        self.assertTrue(rec["grouped_mm"])
        self.assertGreater(rec["comm"]["remote_bytes"], 0)

    def test_two_ranks_gelu_loop(self):
        rec, _ = self._bench(2, ["--preset", "custom", "--hidden", "32", "--ffn", "40", "--experts", "6",
                                 "--top-k", "3", "--activation", "gelu", "--no-grouped-mm"])
        self._common(rec, 2, True)
        self.assertFalse(rec["grouped_mm"])
        self.assertIn("loop", rec["expert_gemm"])

    def test_two_ranks_f32_forward_only_qwen_like(self):
        rec, _ = self._bench(2, ["--preset", "qwen2-moe", "--hidden", "64", "--ffn", "32", "--dtype", "f32"],
                             backward=False)
        self._common(rec, 2, False)
        self.assertEqual(rec["preset"], "qwen2-moe-2.7b")
        self.assertEqual(rec["shape"]["experts"], 64)
        self.assertFalse(rec["shape"]["renormalize"])
        for row in rec["check"]["rows"]:
            if row["rel_l2"] is not None:
                self.assertLess(row["rel_l2"], 1e-5, row)  # f32 EP layer vs f32 reference

    def test_check_only(self):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "c.json")
            p = torchrun(2, "bench", "--device", "cpu", "--check-only", "--check-tokens", "16", "--preset", "dsv3",
                         "--hidden", "32", "--ffn", "16", "--experts", "16", "--json", out)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            self.assertIn("check PASS", p.stdout)
            self.assertNotIn("forward", p.stdout)
            with open(out) as f:
                rec = json.load(f)
            self.assertEqual(rec["preset"], "deepseek-v3")
            self.assertEqual((rec["shape"]["experts"], rec["shape"]["top_k"]), (16, 8))
            self.assertTrue(rec["check"]["ok"])
            self.assertNotIn("forward_ms", rec)

    def test_three_ranks(self):
        rec, _ = self._bench(3, ["--preset", "custom", "--hidden", "32", "--ffn", "16", "--experts", "6",
                                 "--top-k", "2"], backward=False)
        self._common(rec, 3, False)


class CheckCanFail(unittest.TestCase):
    """The bench's --check catches a wrong layer (here: renormalisation silently dropped)."""

    def test_broken_layer_fails_check(self):
        import torch.distributed as dist

        with tempfile.TemporaryDirectory() as d:
            dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
            try:
                shape = dict(hidden=32, ffn=16, experts=4, top_k=2, activation="swiglu", renormalize=True)
                dev = torch.device("cpu")

                def mk(s, *shp):
                    return tr._seeded(shp, s, dev, 0.2, torch.float32).requires_grad_()

                wr, w0, w1 = mk(1, 4, 32), mk(2, 4, 32, 32), mk(3, 4, 32, 16)
                layer = tr.EPMoE(shape, 1, 0, dist.group.WORLD, wr, w0, w1, False)
                ok, _ = tr._check_layer(layer, shape, 16, dev, torch.float32, 0, 1, 0, dist.group.WORLD, 1e-2, 1e-3)
                self.assertTrue(ok)
                layer.s = dict(shape, renormalize=False)  # the bug
                ok, rows = tr._check_layer(layer, shape, 16, dev, torch.float32, 0, 1, 0, dist.group.WORLD, 1e-2, 1e-3)
                self.assertFalse(ok)
                self.assertEqual({r["tensor"]: r["status"] for r in rows}["y"], "FAIL")
            finally:
                dist.destroy_process_group()


if __name__ == "__main__":
    unittest.main(verbosity=2)
