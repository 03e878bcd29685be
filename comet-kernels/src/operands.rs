//! Operand descriptions of a grouped GEMM and the checks both tile engines share: the
//! portable `mma.sync` engine ([`crate::gemm::plan`]) and the Hopper engine
//! ([`crate::sm90::plan`]). Each engine adds its own limits (tile shapes, output dtypes,
//! shared memory, tensor maps) around these.

use crate::buffer::{DType, DeviceTensor};
use crate::error::{Error, Result};
use crate::gemm::{Epilogue, GemmKind};

/// dtype + shape of an operand (what validation needs; no device memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl Meta {
    /// Meta of a tensor.
    pub fn of(t: &DeviceTensor) -> Meta {
        Meta {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
        }
    }
    /// Meta from parts.
    pub fn new(dtype: DType, shape: &[usize]) -> Meta {
        Meta {
            dtype,
            shape: shape.to_vec(),
        }
    }
}

/// `m`'s dtype is one of `allowed`, else [`Error::DType`] naming them.
pub(crate) fn expect_dtype(what: &str, m: &Meta, allowed: &[DType]) -> Result<()> {
    if allowed.contains(&m.dtype) {
        Ok(())
    } else {
        Err(Error::DType {
            what: what.to_string(),
            got: m.dtype.to_string(),
            expected: allowed
                .iter()
                .map(|d| d.name())
                .collect::<Vec<_>>()
                .join(" or "),
        })
    }
}

/// `m` has `rank` dimensions.
pub(crate) fn expect_rank(what: &str, m: &Meta, rank: usize) -> Result<()> {
    if m.shape.len() == rank {
        Ok(())
    } else {
        Err(Error::shape(what, &m.shape, format!("rank {rank}")))
    }
}

/// `v` is a multiple of 8 elements (16 bytes of bf16/f16); `why` is the engine's reason.
pub(crate) fn multiple_of_8(what: &str, v: usize, why: &'static str) -> Result<()> {
    if v % 8 == 0 {
        Ok(())
    } else {
        Err(Error::Alignment {
            what: what.to_string(),
            value: v,
            multiple: 8,
            why,
        })
    }
}

/// `v` fits the kernels' i32 sizes.
pub(crate) fn fits_i32(what: &str, v: usize) -> Result<()> {
    if v <= i32::MAX as usize {
        Ok(())
    } else {
        Err(Error::limit(what, v, i32::MAX.to_string()))
    }
}

/// The group count of expert offsets, i32 `[groups + 1]` with `groups >= 1`.
pub(crate) fn groups_from_offsets(o: &Meta) -> Result<usize> {
    expect_dtype("offsets", o, &[DType::I32])?;
    expect_rank("offsets", o, 1)?;
    if o.shape[0] < 2 {
        return Err(Error::shape(
            "offsets",
            &o.shape,
            "[groups + 1] with groups >= 1",
        ));
    }
    Ok(o.shape[0] - 1)
}

/// Activations are fused into the forward GEMM only.
pub(crate) fn check_epilogue(kind: GemmKind, epilogue: Epilogue) -> Result<()> {
    if kind != GemmKind::Forward && epilogue != Epilogue::None {
        return Err(Error::Invalid(format!(
            "{epilogue:?} epilogue is fused into the forward GEMM only"
        )));
    }
    Ok(())
}

/// A row scale is f32 `[rows_cap]`.
pub(crate) fn check_row_scale(s: &Meta, rows_cap: usize) -> Result<()> {
    expect_dtype("row_scale", s, &[DType::F32])?;
    if s.shape != [rows_cap] {
        return Err(Error::shape("row_scale", &s.shape, format!("[{rows_cap}]")));
    }
    Ok(())
}

/// What the operands of a grouped GEMM determine once checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GemmDims {
    /// Rows of the row operands (A's first dimension).
    pub rows_cap: usize,
    /// N: rows of each weight (forward, dgrad) or of each weight gradient (wgrad).
    pub n: usize,
    /// K: columns of each weight (forward, dgrad) or of each weight gradient (wgrad).
    pub k: usize,
    /// Columns of C: `N` forward (`N/2` with SwiGLU), `K` dgrad and wgrad.
    pub out_cols: usize,
}

/// What differs between the engines in [`check_shapes`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct EngineRules {
    /// 2-D `[N, K]` weights are accepted when there is one group.
    pub ungrouped_weights: bool,
    /// The engine's reason for rows of 16-byte multiples (in alignment errors).
    pub why: &'static str,
}

/// Checks B and C against A (rank 2, checked by the caller), `groups` and the epilogue
/// for the layouts of `kind` (see [`crate::gemm`]), and derives the GEMM's sizes.
pub(crate) fn check_shapes(
    kind: GemmKind,
    epilogue: Epilogue,
    a: &Meta,
    b: &Meta,
    c: &Meta,
    groups: usize,
    rules: EngineRules,
) -> Result<GemmDims> {
    let EngineRules {
        ungrouped_weights,
        why,
    } = rules;
    let (rows_cap, a_cols) = match a.shape.as_slice() {
        [r, c] => (*r, *c),
        _ => return Err(Error::shape("A", &a.shape, "rank 2 [rows, cols]")),
    };
    let dims = match kind {
        GemmKind::Forward | GemmKind::Dgrad => {
            // B: [G, N, K] or, where allowed, [N, K] with one group.
            let (bg, bn, bk) = match b.shape.as_slice() {
                [g, n, k] => (*g, *n, *k),
                [n, k] if ungrouped_weights && groups == 1 => (1, *n, *k),
                _ => {
                    return Err(Error::shape(
                        "B (weights)",
                        &b.shape,
                        format!("[{groups}, N, K]"),
                    ));
                }
            };
            if bg != groups {
                return Err(Error::shape(
                    "B (weights)",
                    &b.shape,
                    format!("{groups} groups (from the offsets)"),
                ));
            }
            let out_cols = if kind == GemmKind::Forward {
                if a_cols != bk {
                    return Err(Error::shape(
                        "A",
                        &a.shape,
                        format!("[rows, {bk}] (K of the weights)"),
                    ));
                }
                multiple_of_8("K (reduction of the forward GEMM)", bk, why)?;
                if epilogue == Epilogue::SwiGlu && bn % 2 != 0 {
                    return Err(Error::Alignment {
                        what: "N of a SwiGLU weight (2F)".into(),
                        value: bn,
                        multiple: 2,
                        why: "gate and up halves",
                    });
                }
                if epilogue == Epilogue::SwiGlu {
                    bn / 2
                } else {
                    bn
                }
            } else {
                if a_cols != bn {
                    return Err(Error::shape(
                        "A (output gradient rows)",
                        &a.shape,
                        format!("[rows, {bn}] (N of the weights)"),
                    ));
                }
                multiple_of_8("N (reduction of the dgrad GEMM)", bn, why)?;
                multiple_of_8("K (output of the dgrad GEMM)", bk, why)?;
                bk
            };
            if c.shape != [rows_cap, out_cols] {
                return Err(Error::shape(
                    "C",
                    &c.shape,
                    format!("[{rows_cap}, {out_cols}]"),
                ));
            }
            GemmDims {
                rows_cap,
                n: bn,
                k: bk,
                out_cols,
            }
        }
        GemmKind::Wgrad => {
            expect_rank("B (input rows)", b, 2)?;
            if b.shape[0] != rows_cap {
                return Err(Error::shape(
                    "B (input rows)",
                    &b.shape,
                    format!("[{rows_cap}, K] (rows of A)"),
                ));
            }
            let (wn, wk) = (a_cols, b.shape[1]);
            multiple_of_8("N (rows of the weight gradient)", wn, why)?;
            multiple_of_8("K (columns of the weight gradient)", wk, why)?;
            if c.shape != [groups, wn, wk] {
                return Err(Error::shape(
                    "C (weight gradient)",
                    &c.shape,
                    format!("[{groups}, {wn}, {wk}]"),
                ));
            }
            GemmDims {
                rows_cap,
                n: wn,
                k: wk,
                out_cols: wk,
            }
        }
    };
    Ok(dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(shape: &[usize]) -> Meta {
        Meta::new(DType::BF16, shape)
    }

    const RULES: EngineRules = EngineRules {
        ungrouped_weights: false,
        why: "the reason",
    };

    fn check(
        kind: GemmKind,
        epilogue: Epilogue,
        [a, b, c]: [&[usize]; 3],
        groups: usize,
        rules: EngineRules,
    ) -> Result<GemmDims> {
        check_shapes(kind, epilogue, &m(a), &m(b), &m(c), groups, rules)
    }

    #[test]
    fn dims_of_the_three_layouts() {
        use GemmKind::*;
        let none = Epilogue::None;
        let f = check(
            Forward,
            none,
            [&[10, 64], &[2, 128, 64], &[10, 128]],
            2,
            RULES,
        )
        .unwrap();
        assert_eq!((f.rows_cap, f.n, f.k, f.out_cols), (10, 128, 64, 128));
        let s = check(
            Forward,
            Epilogue::SwiGlu,
            [&[10, 64], &[2, 128, 64], &[10, 64]],
            2,
            RULES,
        )
        .unwrap();
        assert_eq!(s.out_cols, 64);
        let d = check(
            Dgrad,
            none,
            [&[10, 128], &[2, 128, 64], &[10, 64]],
            2,
            RULES,
        )
        .unwrap();
        assert_eq!((d.n, d.k, d.out_cols), (128, 64, 64));
        let w = check(
            Wgrad,
            none,
            [&[10, 128], &[10, 64], &[2, 128, 64]],
            2,
            RULES,
        )
        .unwrap();
        assert_eq!((w.n, w.k, w.out_cols), (128, 64, 64));
    }

    #[test]
    fn two_dimensional_weights_only_where_allowed() {
        let shapes: [&[usize]; 3] = [&[10, 64], &[128, 64], &[10, 128]];
        let allow = EngineRules {
            ungrouped_weights: true,
            ..RULES
        };
        let ok = check(GemmKind::Forward, Epilogue::None, shapes, 1, allow).unwrap();
        assert_eq!(ok.n, 128);
        let e = check(GemmKind::Forward, Epilogue::None, shapes, 1, RULES).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{e}");
        assert!(e.to_string().contains("[1, N, K]"), "{e}");
    }

    #[test]
    fn errors_name_the_value_and_the_engine_reason() {
        use GemmKind::Wgrad;
        let none = Epilogue::None;
        let e = check(
            Wgrad,
            none,
            [&[10, 100], &[10, 64], &[2, 100, 64]],
            2,
            RULES,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Alignment {
                    value: 100,
                    multiple: 8,
                    why: "the reason",
                    ..
                }
            ),
            "{e}"
        );
        let e = check(Wgrad, none, [&[10, 64], &[9, 64], &[2, 64, 64]], 2, RULES).unwrap_err();
        assert!(e.to_string().contains("[10, K]"), "{e}");
        let e = check(Wgrad, none, [&[10], &[10, 64], &[2, 64, 64]], 2, RULES).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{e}");
        assert!(matches!(
            groups_from_offsets(&Meta::new(DType::I32, &[1])),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            groups_from_offsets(&Meta::new(DType::U32, &[3])),
            Err(Error::DType { .. })
        ));
        assert_eq!(
            groups_from_offsets(&Meta::new(DType::I32, &[9])).unwrap(),
            8
        );
        assert!(matches!(
            check_epilogue(GemmKind::Dgrad, Epilogue::Gelu),
            Err(Error::Invalid(_))
        ));
        assert!(check_epilogue(GemmKind::Forward, Epilogue::Gelu).is_ok());
        assert!(matches!(
            check_row_scale(&Meta::new(DType::F32, &[9]), 10),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check_row_scale(&Meta::new(DType::BF16, &[10]), 10),
            Err(Error::DType { .. })
        ));
        assert!(matches!(
            fits_i32("rows", i32::MAX as usize + 1),
            Err(Error::Limit { .. })
        ));
    }
}
