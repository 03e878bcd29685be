//! [`MoeWeights`]: router and expert weights of one MoE layer.

use ndarray::{Array2, Array3, s};

use crate::config::{MoeConfig, ParallelConfig};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::numeric::{random_array, round_to};
use crate::real::Real;

/// Weights of one MoE layer, stored like `torch.nn.Linear` (`[out, in]`).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeWeights<T> {
    /// Router `[E, H]`: `logits = x · wrᵀ`.
    pub wr: Array2<T>,
    /// First expert GEMM `[E, n0, H]`; SwiGLU rows `0..F` are the gate, `F..2F` the up
    /// projection.
    pub w0: Array3<T>,
    /// Second expert GEMM `[E, H, F]`.
    pub w1: Array3<T>,
}

impl<T: Real> MoeWeights<T> {
    /// Seeded random weights scaled so that, for `x ~ N(0, 1)`, logits and `h` are
    /// `O(1)`: `wr, w0 ~ N(0, 1/H)`, `w1 ~ N(0, 1/F)`. Tensors use seeds `seed`, `seed + 1`,
    /// `seed + 2` with [`random_array`], so f32 and f64 weights of one seed agree up to
    /// rounding.
    pub fn random(cfg: &MoeConfig, seed: u64) -> Self {
        let (h, f, e, n0) = (cfg.hidden(), cfg.ffn(), cfg.experts(), cfg.n0());
        let sh = 1.0 / (h as f64).sqrt();
        let sf = 1.0 / (f as f64).sqrt();
        MoeWeights {
            wr: random_array((e, h), sh, seed),
            w0: random_array((e, n0, h), sh, seed.wrapping_add(1)),
            w1: random_array((e, h, f), sf, seed.wrapping_add(2)),
        }
    }

    /// All-zero weights of `cfg`'s shapes.
    pub fn zeros(cfg: &MoeConfig) -> Self {
        let (h, f, e, n0) = (cfg.hidden(), cfg.ffn(), cfg.experts(), cfg.n0());
        MoeWeights {
            wr: Array2::from_elem((e, h), T::ZERO),
            w0: Array3::from_elem((e, n0, h), T::ZERO),
            w1: Array3::from_elem((e, h, f), T::ZERO),
        }
    }

    /// Number of experts held (`w0`'s first axis).
    pub fn experts(&self) -> usize {
        self.w0.dim().0
    }

    /// Checks the shapes against `cfg` (all experts).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] naming the tensor.
    pub fn check(&self, cfg: &MoeConfig) -> Result<()> {
        self.check_shapes(cfg, cfg.experts(), cfg.ffn())
    }

    /// Checks the shapes for `experts` experts of FFN width `ffn` (router always full).
    pub(crate) fn check_shapes(&self, cfg: &MoeConfig, experts: usize, ffn: usize) -> Result<()> {
        let (h, e) = (cfg.hidden(), cfg.experts());
        let n0 = cfg.activation().n0_factor() * ffn;
        let want = [
            (
                "router wr [experts, hidden]",
                vec![e, h],
                self.wr.shape().to_vec(),
            ),
            (
                "w0 [experts, n0, hidden]",
                vec![experts, n0, h],
                self.w0.shape().to_vec(),
            ),
            (
                "w1 [experts, hidden, ffn]",
                vec![experts, h, ffn],
                self.w1.shape().to_vec(),
            ),
        ];
        for (what, expected, got) in want {
            if expected != got {
                return Err(Error::ShapeMismatch {
                    what,
                    expected,
                    got,
                });
            }
        }
        Ok(())
    }

    /// The weights rank `rank` holds under `par`: the full router, the experts of its
    /// expert-parallel rank `r / tp` (`L = E / ep` of them, global ids `(r / tp)·L ..`), and
    /// for `tp > 1` its slice of every expert's FFN columns: tensor-parallel rank `q = r % tp`
    /// holds columns `q·F/tp .. (q+1)·F/tp` of `w1` and the matching rows of `w0` (for
    /// SwiGLU, those rows of the gate half followed by those of the up half, so the slice is
    /// itself a SwiGLU `w0` of width `F/tp`). Summing the `tp` slices' expert outputs gives
    /// the full expert output.
    ///
    /// The activation is inferred from the shapes (`n0 = 2F` SwiGLU, `n0 = F` GeLU).
    ///
    /// # Errors
    /// [`Error::RankOutOfRange`], [`Error::ExpertsNotDivisible`], [`Error::FfnNotDivisible`],
    /// or [`Error::ShapeMismatch`] if `w0`/`w1` are not a valid expert pair.
    pub fn local(&self, rank: usize, par: &ParallelConfig) -> Result<MoeWeights<T>> {
        par.check_rank(rank)?;
        let (e, n0, h) = self.w0.dim();
        let f = self.w1.dim().2;
        if self.w1.dim().0 != e || self.w1.dim().1 != h || !(n0 == f || n0 == 2 * f) {
            return Err(Error::ShapeMismatch {
                what: "w1 [experts, hidden, ffn] (must pair with w0 [experts, n0 = ffn or 2*ffn, hidden])",
                expected: vec![e, h, n0],
                got: self.w1.shape().to_vec(),
            });
        }
        if e % par.ep() != 0 {
            return Err(Error::ExpertsNotDivisible {
                experts: e,
                ep: par.ep(),
            });
        }
        if f % par.tp() != 0 {
            return Err(Error::FfnNotDivisible {
                ffn: f,
                tp: par.tp(),
            });
        }
        let l = e / par.ep();
        let fl = f / par.tp();
        let e0 = par.ep_rank(rank) * l;
        let c0 = par.tp_rank(rank) * fl;
        let experts = s![e0..e0 + l, .., ..];
        let w0 = self.w0.slice(experts);
        let w0 = if n0 == 2 * f {
            let mut out = Array3::from_elem((l, 2 * fl, h), T::ZERO);
            out.slice_mut(s![.., ..fl, ..])
                .assign(&w0.slice(s![.., c0..c0 + fl, ..]));
            out.slice_mut(s![.., fl.., ..])
                .assign(&w0.slice(s![.., f + c0..f + c0 + fl, ..]));
            out
        } else {
            w0.slice(s![.., c0..c0 + fl, ..]).to_owned()
        };
        Ok(MoeWeights {
            wr: self.wr.clone(),
            w0,
            w1: self.w1.slice(s![e0..e0 + l, .., c0..c0 + fl]).to_owned(),
        })
    }

    /// Applies `f` to every element (e.g. to change precision).
    pub fn map<U: Real>(&self, f: impl Fn(T) -> U) -> MoeWeights<U> {
        MoeWeights {
            wr: self.wr.mapv(&f),
            w0: self.w0.mapv(&f),
            w1: self.w1.mapv(&f),
        }
    }

    /// Every element rounded through `dtype` (via f32), as the GPU sees the weights.
    pub fn rounded(&self, dtype: DType) -> MoeWeights<T> {
        self.map(|v| T::from_f64(f64::from(round_to(dtype, v.to_f64() as f32))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Activation;
    use crate::numeric::random_normal_f64;
    use crate::reference::ffn::expert_forward;
    use ndarray::Axis;

    #[test]
    fn random_weights_have_config_shapes_and_scale() {
        let cfg = MoeConfig::new(64, 32, 4, 2).unwrap();
        let w = MoeWeights::<f64>::random(&cfg, 3);
        w.check(&cfg).unwrap();
        assert_eq!(w.experts(), 4);
        let var = w.w0.iter().map(|v| v * v).sum::<f64>() / w.w0.len() as f64;
        assert!((var * 64.0 - 1.0).abs() < 0.1, "{var}");
        let w32 = MoeWeights::<f32>::random(&cfg, 3);
        assert_eq!(w.map(|v| v as f32), w32);
        let g = cfg.with_activation(Activation::Gelu);
        assert!(
            matches!(w.check(&g), Err(Error::ShapeMismatch { what, .. }) if what.starts_with("w0"))
        );
        assert_eq!(MoeWeights::<f32>::zeros(&g).w0.dim(), (4, 32, 64));
    }

    #[test]
    fn local_slices_experts_and_ffn_columns() {
        for act in Activation::ALL {
            let cfg = MoeConfig::new(8, 6, 4, 2).unwrap().with_activation(act);
            let w = MoeWeights::<f64>::random(&cfg, 11);
            // Pure EP: rank 1 of 2 holds experts 2, 3.
            let ep = ParallelConfig::expert_parallel(2).unwrap();
            let l1 = w.local(1, &ep).unwrap();
            assert_eq!(l1.w0, w.w0.slice(s![2..4, .., ..]));
            assert_eq!(l1.w1, w.w1.slice(s![2..4, .., ..]));
            assert_eq!(l1.wr, w.wr);
            // EP 2 x TP 3: the tp slices' expert outputs sum to the full expert output.
            let par = ParallelConfig::new(6, 2, 3).unwrap();
            let x = random_normal_f64((5, 8), 4);
            for er in 0..2 {
                for le in 0..2 {
                    let e = er * 2 + le;
                    let (_, _, full) = expert_forward(
                        act,
                        x.view(),
                        w.w0.index_axis(Axis(0), e),
                        w.w1.index_axis(Axis(0), e),
                    );
                    let mut sum = Array2::<f64>::zeros((5, 8));
                    for q in 0..3 {
                        let lw = w.local(er * 3 + q, &par).unwrap();
                        assert_eq!(lw.w1.dim(), (2, 8, 2));
                        assert_eq!(lw.w0.dim(), (2, 2 * act.n0_factor(), 8));
                        let (_, _, part) = expert_forward(
                            act,
                            x.view(),
                            lw.w0.index_axis(Axis(0), le),
                            lw.w1.index_axis(Axis(0), le),
                        );
                        sum += &part;
                    }
                    let err =
                        crate::numeric::rel_l2(sum.as_slice().unwrap(), full.as_slice().unwrap());
                    assert!(err < 1e-14, "{act} expert {e}: {err}");
                }
            }
        }
    }

    #[test]
    fn local_rejects_bad_rank_and_splits() {
        let cfg = MoeConfig::new(8, 6, 4, 2).unwrap();
        let w = MoeWeights::<f32>::random(&cfg, 1);
        let ep = ParallelConfig::expert_parallel(2).unwrap();
        assert_eq!(
            w.local(2, &ep),
            Err(Error::RankOutOfRange { rank: 2, world: 2 })
        );
        let ep3 = ParallelConfig::expert_parallel(3).unwrap();
        assert_eq!(
            w.local(0, &ep3),
            Err(Error::ExpertsNotDivisible { experts: 4, ep: 3 })
        );
        let tp4 = ParallelConfig::new(4, 1, 4).unwrap();
        assert_eq!(
            w.local(0, &tp4),
            Err(Error::FfnNotDivisible { ffn: 6, tp: 4 })
        );
    }

    #[test]
    fn rounded_goes_through_the_dtype() {
        let cfg = MoeConfig::new(8, 6, 2, 1).unwrap();
        let w = MoeWeights::<f32>::random(&cfg, 9);
        let r = w.rounded(DType::BF16);
        assert!(
            r.w0.iter()
                .zip(w.w0.iter())
                .all(|(a, b)| *a == crate::numeric::round_bf16(*b))
        );
        assert_ne!(r, w);
        assert_eq!(w.rounded(DType::F32), w);
    }
}
