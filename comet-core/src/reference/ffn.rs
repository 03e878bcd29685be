//! Expert FFN pieces: f64-accumulating matrix products and the activations with their
//! derivatives.

use ndarray::{Array2, ArrayView2, Axis, s};

use crate::dtype::Activation;
use crate::real::Real;

fn widen<T: Real>(a: ArrayView2<T>) -> Array2<f64> {
    a.mapv(T::to_f64)
}

fn narrow<T: Real>(a: Array2<f64>) -> Array2<T> {
    a.mapv(T::from_f64)
}

/// `a · bᵀ` for `a` `[m, K]`, `b` `[n, K]` → `[m, n]`; products and sums in f64, one
/// rounding to `T` (the layout of every forward GEMM: both operands K-contiguous).
/// The caller guarantees matching `K`.
pub(crate) fn matmul_nt<T: Real>(a: ArrayView2<T>, b: ArrayView2<T>) -> Array2<T> {
    narrow(widen(a).dot(&widen(b).t()))
}

/// `a · b` for `a` `[m, K]`, `b` `[K, n]`, f64 accumulation, one rounding.
pub(crate) fn matmul_nn<T: Real>(a: ArrayView2<T>, b: ArrayView2<T>) -> Array2<T> {
    narrow(widen(a).dot(&widen(b)))
}

/// `aᵀ · b` for `a` `[K, m]`, `b` `[K, n]` (the weight-gradient layout), f64 accumulation,
/// one rounding.
pub(crate) fn matmul_tn<T: Real>(a: ArrayView2<T>, b: ArrayView2<T>) -> Array2<T> {
    narrow(widen(a).t().dot(&widen(b)))
}

/// `silu(g) = g / (1 + e^{−g})`.
pub fn silu(g: f64) -> f64 {
    g / (1.0 + (-g).exp())
}

/// `d silu / dg = σ(g) · (1 + g · (1 − σ(g)))`, `σ(g) = 1 / (1 + e^{−g})`.
pub fn silu_grad(g: f64) -> f64 {
    let sig = 1.0 / (1.0 + (-g).exp());
    sig * (1.0 + g * (1.0 - sig))
}

/// Exact GeLU `½ x (1 + erf(x / √2))`.
pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// `d gelu / dx = Φ(x) + x · φ(x)`.
pub fn gelu_grad(x: f64) -> f64 {
    let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    cdf + x * pdf
}

/// The activation on GEMM0's output `h` `[rows, n0]` → `a` `[rows, F]`, computed in f64 from
/// the `T` values of `h` and rounded once to `T`.
///
/// SwiGLU: `a[r, c] = silu(h[r, c]) · h[r, F + c]`; GeLU: `a = gelu(h)`. `h` must have
/// `n0 = factor · F` columns (see [`Activation::n0_factor`]); the caller checks it.
pub fn activate<T: Real>(act: Activation, h: ArrayView2<T>) -> Array2<T> {
    match act {
        Activation::SwiGlu => {
            let f = h.ncols() / 2;
            let (gate, up) = (h.slice(s![.., ..f]), h.slice(s![.., f..2 * f]));
            let mut out = Array2::from_elem((h.nrows(), f), T::ZERO);
            ndarray::Zip::from(&mut out)
                .and(&gate)
                .and(&up)
                .for_each(|o, &g, &u| *o = T::from_f64(silu(g.to_f64()) * u.to_f64()));
            out
        }
        Activation::Gelu => h.mapv(|v| T::from_f64(gelu(v.to_f64()))),
    }
}

/// Backward of [`activate`]: `da` `[rows, F]` → `dh` `[rows, n0]`, in f64, rounded once.
///
/// SwiGLU: `dh[r, c] = da · silu'(g) · u`, `dh[r, F + c] = da · silu(g)`; GeLU:
/// `dh = da · gelu'(h)`.
pub fn activate_backward<T: Real>(
    act: Activation,
    h: ArrayView2<T>,
    da: ArrayView2<T>,
) -> Array2<T> {
    match act {
        Activation::SwiGlu => {
            let f = h.ncols() / 2;
            let mut dh = Array2::from_elem((h.nrows(), 2 * f), T::ZERO);
            for ((hr, dar), mut dhr) in h
                .axis_iter(Axis(0))
                .zip(da.axis_iter(Axis(0)))
                .zip(dh.axis_iter_mut(Axis(0)))
            {
                for c in 0..f {
                    let (g, u, d) = (hr[c].to_f64(), hr[f + c].to_f64(), dar[c].to_f64());
                    dhr[c] = T::from_f64(d * silu_grad(g) * u);
                    dhr[f + c] = T::from_f64(d * silu(g));
                }
            }
            dh
        }
        Activation::Gelu => {
            let mut dh = Array2::from_elem(h.dim(), T::ZERO);
            ndarray::Zip::from(&mut dh)
                .and(&h)
                .and(&da)
                .for_each(|o, &x, &d| *o = T::from_f64(d.to_f64() * gelu_grad(x.to_f64())));
            dh
        }
    }
}

/// One expert's forward on `x` `[rows, H]` with `w0e` `[n0, H]`, `w1e` `[H, F]`:
/// `(h, a, o)` = (`x · w0eᵀ`, `act(h)`, `a · w1eᵀ`).
pub fn expert_forward<T: Real>(
    act: Activation,
    x: ArrayView2<T>,
    w0e: ArrayView2<T>,
    w1e: ArrayView2<T>,
) -> (Array2<T>, Array2<T>, Array2<T>) {
    let h = matmul_nt(x, w0e);
    let a = activate(act, h.view());
    let o = matmul_nt(a.view(), w1e);
    (h, a, o)
}

/// Gradients of one expert given `d_o` `[rows, H]` (already weighted by the router):
/// `(da, dh, dx, dw0e, dw1e)` with `da = d_o · w1e`, `dh = act'(h, da)`, `dx = dh · w0e`,
/// `dw0e = dhᵀ · x`, `dw1e = d_oᵀ · a`.
pub(crate) struct ExpertGrads<T> {
    pub da: Array2<T>,
    pub dh: Array2<T>,
    pub dx: Array2<T>,
    pub dw0: Array2<T>,
    pub dw1: Array2<T>,
}

pub(crate) fn expert_backward<T: Real>(
    act: Activation,
    x: ArrayView2<T>,
    h: ArrayView2<T>,
    a: ArrayView2<T>,
    d_o: ArrayView2<T>,
    w0e: ArrayView2<T>,
    w1e: ArrayView2<T>,
) -> ExpertGrads<T> {
    let da = matmul_nn(d_o, w1e);
    let dh = activate_backward(act, h, da.view());
    let dx = matmul_nn(dh.view(), w0e);
    let dw0 = matmul_tn(dh.view(), x);
    let dw1 = matmul_tn(d_o, a);
    ExpertGrads {
        da,
        dh,
        dx,
        dw0,
        dw1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn fd(f: fn(f64) -> f64, x: f64) -> f64 {
        let e = 1e-6;
        (f(x + e) - f(x - e)) / (2.0 * e)
    }

    #[test]
    fn scalar_derivatives_match_finite_differences() {
        for &x in &[-6.0, -2.5, -0.7, 0.0, 0.3, 1.9, 5.0] {
            assert!((silu_grad(x) - fd(silu, x)).abs() < 1e-8, "silu' at {x}");
            assert!((gelu_grad(x) - fd(gelu, x)).abs() < 1e-8, "gelu' at {x}");
        }
        // Known values.
        assert!((gelu(1.0) - 0.841_344_746_068_542_9).abs() < 1e-15);
        assert!((silu(1.0) - 0.731_058_578_630_004_9).abs() < 1e-15);
        assert_eq!(silu(-800.0), -0.0);
    }

    #[test]
    fn swiglu_pairs_gate_and_up_columns() {
        let h = array![[1.0f64, -2.0, 3.0, 0.5]];
        let a = activate(Activation::SwiGlu, h.view());
        assert_eq!(a, array![[silu(1.0) * 3.0, silu(-2.0) * 0.5]]);
        let g = activate(Activation::Gelu, h.view());
        assert_eq!(g[[0, 1]], gelu(-2.0));
    }

    #[test]
    fn matmuls_agree_with_loops() {
        let a = array![[1.0f64, 2.0], [3.0, 4.0], [5.0, 6.0]];
        let b = array![[1.0f64, 0.5], [-1.0, 2.0]];
        assert_eq!(
            matmul_nt(a.view(), b.view()),
            array![[2.0, 3.0], [5.0, 5.0], [8.0, 7.0]]
        );
        assert_eq!(
            matmul_nn(a.view(), b.view()),
            array![[-1.0, 4.5], [-1.0, 9.5], [-1.0, 14.5]]
        );
        assert_eq!(
            matmul_tn(a.view(), a.view()),
            array![[35.0, 44.0], [44.0, 56.0]]
        );
        // f32 operands accumulate in f64: 1 + 2^-30 - 1 survives.
        let x = array![[1.0f32, 2f32.powi(-30), -1.0]];
        let y = array![[1.0f32, 1.0, 1.0]];
        assert_eq!(matmul_nt(x.view(), y.view())[[0, 0]], 2f32.powi(-30));
    }
}
