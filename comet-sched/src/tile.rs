//! GEMM tile geometry, the order of n-tiles inside a schedule, and the Hopper engine's
//! canonical tile ids.

use std::ops::Range;

use crate::error::{Error, Result};

/// Output tile geometry of a grouped GEMM: `bm` rows by `bn` columns, `n` output columns.
///
/// For the Hopper engine (`comet_kernels::sm90`) `bm = 128` and `bn` is the configuration's
/// *output* tile width (`out_bn`: half the accumulator width with the SwiGLU epilogue), and
/// `n` the output columns (`F` for GEMM0 with its activation, `H` for GEMM1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileShape {
    bm: usize,
    bn: usize,
    n: usize,
}

impl TileShape {
    /// A tile shape.
    ///
    /// # Errors
    /// [`Error::ZeroSize`] if `bm`, `bn` or `n` is 0.
    pub fn new(bm: usize, bn: usize, n: usize) -> Result<Self> {
        for (name, v) in [("bm", bm), ("bn", bn), ("n", n)] {
            if v == 0 {
                return Err(Error::ZeroSize { name });
            }
        }
        Ok(TileShape { bm, bn, n })
    }

    /// Rows per tile.
    pub fn bm(&self) -> usize {
        self.bm
    }

    /// Columns per tile.
    pub fn bn(&self) -> usize {
        self.bn
    }

    /// Output columns of the GEMM.
    pub fn n(&self) -> usize {
        self.n
    }

    /// n-tiles per m-tile: `⌈n / bn⌉` (the last one may be partial).
    pub fn n_tiles(&self) -> usize {
        self.n.div_ceil(self.bn)
    }

    /// m-tiles of an expert with `rows` rows: `⌈rows / bm⌉`.
    pub fn m_tiles(&self, rows: usize) -> usize {
        rows.div_ceil(self.bm)
    }

    /// Output columns of n-tile `n_tile` (clipped to `n`).
    pub fn cols(&self, n_tile: usize) -> Range<usize> {
        let c0 = (n_tile * self.bn).min(self.n);
        c0..(c0 + self.bn).min(self.n)
    }
}

/// How the n-tiles of the m-tiles a schedule puts next to each other are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NOrder {
    /// All n-tiles of one m-tile, then the next m-tile (the m-tile's rows stay in L2; each
    /// tile needs exactly one m-tile's flags, so a tile becomes runnable as early as it can).
    Together,
    /// Runs of up to `band` consecutive m-tiles of the same expert and the same readiness
    /// class are walked n-tile by n-tile with the m-tiles fastest, like the engine's raster
    /// band: consecutive tiles share their weight tile (L2, and TMA multicast when a 2-CTA
    /// cluster takes slots `2u, 2u + 1`). `band` 0 is rejected.
    Interleaved {
        /// m-tiles per run.
        band: usize,
    },
}

impl NOrder {
    /// Checks the parameter.
    ///
    /// # Errors
    /// [`Error::ZeroSize`] for `Interleaved { band: 0 }`.
    pub fn validate(&self) -> Result<()> {
        match self {
            NOrder::Interleaved { band: 0 } => Err(Error::ZeroSize {
                name: "interleave band",
            }),
            _ => Ok(()),
        }
    }

    /// Expands a sequence of m-tiles, cut into runs by `same_run(previous, next)` (only
    /// used by [`NOrder::Interleaved`]), into `(m-tile index into `m_tiles`, n-tile)` pairs.
    pub(crate) fn expand<T>(
        &self,
        m_tiles: &[T],
        n_tiles: Range<usize>,
        same_run: impl Fn(&T, &T) -> bool,
    ) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(m_tiles.len() * n_tiles.len());
        match *self {
            NOrder::Together => {
                for i in 0..m_tiles.len() {
                    for n in n_tiles.clone() {
                        out.push((i, n));
                    }
                }
            }
            NOrder::Interleaved { band } => {
                let band = band.max(1);
                let mut start = 0;
                while start < m_tiles.len() {
                    let mut end = start + 1;
                    while end < m_tiles.len()
                        && end - start < band
                        && same_run(&m_tiles[end - 1], &m_tiles[end])
                    {
                        end += 1;
                    }
                    for n in n_tiles.clone() {
                        for i in start..end {
                            out.push((i, n));
                        }
                    }
                    start = end;
                }
            }
        }
        out
    }
}

/// The canonical tile ids of the Hopper engine's row-grouped scheduler
/// (`comet-kernels/cuda/sm90/scheduler.cuh`, `GroupedScheduler::tile`), whose `order` input
/// is a list of these ids.
///
/// With `mt[e]` m-tiles for expert `e`, `pref[e] = Σ_{e' < e} mt[e']`, `nt` n-tiles and band
/// size `B` (`Sm90Config::band`, 16 by default), expert `e` owns ids
/// `pref[e]·nt .. pref[e+1]·nt`. Inside an expert, local id `q` lies in band
/// `b = q / (B·nt)` (m-tiles `b·B .. b·B + g`, `g = min(B, mt[e] − b·B)`); with
/// `r = q − b·B·nt` and `ge = g & !1` (the even part of the band):
/// - `r < ge·nt`: `n = r / ge`, `m = b·B + r mod ge` (pairs of m-tiles share their n-tile);
/// - otherwise (odd `g`, the band's last m-tile): `n = r − ge·nt`, `m = b·B + g − 1`.
///
/// [`CanonicalTiles::id`] is the inverse. Empty experts own no ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalTiles {
    pref: Vec<usize>,
    n_tiles: usize,
    band: usize,
}

impl CanonicalTiles {
    /// The id space for experts with `m_tiles[e]` m-tiles each, `n_tiles` n-tiles and raster
    /// band `band`.
    ///
    /// # Errors
    /// [`Error::ZeroSize`] for `n_tiles` or `band` 0; [`Error::TooLarge`] if the tile count
    /// exceeds the engine's `i32` ids.
    pub fn new(m_tiles: &[usize], n_tiles: usize, band: usize) -> Result<Self> {
        if n_tiles == 0 {
            return Err(Error::ZeroSize { name: "n_tiles" });
        }
        if band == 0 {
            return Err(Error::ZeroSize { name: "band" });
        }
        let mut pref = Vec::with_capacity(m_tiles.len() + 1);
        let mut acc = 0u128;
        pref.push(0);
        for &m in m_tiles {
            acc += m as u128;
            pref.push(acc as usize);
        }
        let total = acc * n_tiles as u128;
        if total > i32::MAX as u128 {
            return Err(Error::TooLarge {
                what: "tiles of the grouped GEMM (engine tile ids are i32)",
                value: total,
                limit: i32::MAX as u128,
            });
        }
        Ok(CanonicalTiles {
            pref,
            n_tiles,
            band,
        })
    }

    /// Number of tiles (ids `0..total`).
    pub fn total(&self) -> usize {
        self.pref.last().copied().unwrap_or(0) * self.n_tiles
    }

    /// m-tiles of expert `e`.
    fn mt(&self, e: usize) -> usize {
        self.pref[e + 1] - self.pref[e]
    }

    /// Canonical id of tile `(e, m, n)`.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] if the expert, m-tile or n-tile does not exist.
    pub fn id(&self, e: usize, m: usize, n: usize) -> Result<u32> {
        let experts = self.pref.len() - 1;
        if e >= experts {
            return Err(Error::OutOfRange {
                what: "expert of a tile".into(),
                index: e,
                len: experts,
            });
        }
        let mt = self.mt(e);
        if m >= mt {
            return Err(Error::OutOfRange {
                what: format!("m-tile of expert {e}"),
                index: m,
                len: mt,
            });
        }
        if n >= self.n_tiles {
            return Err(Error::OutOfRange {
                what: "n-tile".into(),
                index: n,
                len: self.n_tiles,
            });
        }
        let (bsz, nt) = (self.band, self.n_tiles);
        let b = m / bsz;
        let g = bsz.min(mt - b * bsz);
        let ge = g & !1;
        let mi = m - b * bsz;
        let r = if mi < ge { n * ge + mi } else { ge * nt + n };
        Ok((self.pref[e] * nt + b * bsz * nt + r) as u32)
    }

    /// Decodes a canonical id into `(expert, m-tile, n-tile)`, or `None` for an id the
    /// engine skips (outside `0..total`). A line-by-line transcription of
    /// `GroupedScheduler::tile` (row-grouped branch).
    pub fn decode(&self, c: i64) -> Option<(usize, usize, usize)> {
        let total = self.total() as i64;
        if c < 0 || c >= total {
            return None;
        }
        let c = c as usize;
        let nt = self.n_tiles;
        let experts = self.pref.len() - 1;
        // Last expert with pref[e] <= q (experts with no tiles are skipped naturally).
        let q = c / nt;
        let (mut lo, mut hi) = (0usize, experts);
        while hi - lo > 1 {
            let mid = (lo + hi) >> 1;
            if self.pref[mid] <= q {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let e = lo;
        let local = c - self.pref[e] * nt;
        let mt = self.pref[e + 1] - self.pref[e];
        let bsz = self.band;
        let band = local / (bsz * nt);
        let r = local - band * bsz * nt;
        let g = bsz.min(mt - band * bsz);
        let ge = g & !1;
        let (n, m) = if r < ge * nt {
            let n = r / ge;
            (n, band * bsz + (r - n * ge))
        } else {
            (r - ge * nt, band * bsz + g - 1)
        };
        Some((e, m, n))
    }

    /// The engine's `order` array for tiles given in processing order: `ids` followed by
    /// `-1` (skipped slots) up to `len` (the engine wants at least `Sm90Plan::max_tiles`).
    ///
    /// # Errors
    /// [`Error::TooLarge`] if `len` is shorter than the tiles given or longer than `i32`
    /// slots; [`Error::OutOfRange`] for a tile that does not exist.
    pub fn engine_order(
        &self,
        tiles: impl IntoIterator<Item = (usize, usize, usize)>,
        len: usize,
    ) -> Result<Vec<i32>> {
        if len > i32::MAX as usize {
            return Err(Error::TooLarge {
                what: "tile order length (engine slots are i32)",
                value: len as u128,
                limit: i32::MAX as u128,
            });
        }
        let mut out = Vec::with_capacity(len);
        for (e, m, n) in tiles {
            out.push(self.id(e, m, n)? as i32);
        }
        if out.len() > len {
            return Err(Error::TooLarge {
                what: "tiles of the schedule (for a tile order of the given length)",
                value: out.len() as u128,
                limit: len as u128,
            });
        }
        out.resize(len, -1);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_shape_counts_and_rejects_zero() {
        let t = TileShape::new(128, 256, 1000).unwrap();
        assert_eq!(t.n_tiles(), 4);
        assert_eq!(t.cols(3), 768..1000);
        assert_eq!(t.m_tiles(0), 0);
        assert_eq!(t.m_tiles(129), 2);
        for (bm, bn, n, name) in [(0, 1, 1, "bm"), (1, 0, 1, "bn"), (1, 1, 0, "n")] {
            match TileShape::new(bm, bn, n) {
                Err(Error::ZeroSize { name: got }) => assert_eq!(got, name),
                other => panic!("expected ZeroSize({name}), got {other:?}"),
            }
        }
    }

    #[test]
    fn canonical_ids_are_a_bijection_and_decode_inverts_id() {
        for band in [1usize, 2, 3, 4, 16] {
            for nt in [1usize, 2, 5] {
                let mts = [0usize, 1, 2, 3, 7, 0, 16, 17, 33, 0];
                let c = CanonicalTiles::new(&mts, nt, band).unwrap();
                assert_eq!(c.total(), mts.iter().sum::<usize>() * nt);
                let mut seen = vec![false; c.total()];
                for (e, &mt) in mts.iter().enumerate() {
                    for m in 0..mt {
                        for n in 0..nt {
                            let id = c.id(e, m, n).unwrap() as usize;
                            assert!(!seen[id], "id {id} twice (band {band}, nt {nt})");
                            seen[id] = true;
                            assert_eq!(c.decode(id as i64), Some((e, m, n)));
                        }
                    }
                }
                assert!(seen.iter().all(|&s| s));
                assert_eq!(c.decode(-1), None);
                assert_eq!(c.decode(c.total() as i64), None);
            }
        }
    }

    /// The raster the engine runs when no order is given, worked by hand: band 2, one
    /// expert of 3 m-tiles, 2 n-tiles: the pair (m0, m1) goes n by n with m fastest, then
    /// the odd m-tile m2 for every n. A second expert's ids follow the first's.
    #[test]
    fn canonical_order_pinned_on_a_small_case() {
        let c = CanonicalTiles::new(&[3, 1], 2, 2).unwrap();
        let decoded: Vec<_> = (0..8).map(|i| c.decode(i).unwrap()).collect();
        assert_eq!(
            decoded,
            vec![
                (0, 0, 0),
                (0, 1, 0),
                (0, 0, 1),
                (0, 1, 1),
                (0, 2, 0),
                (0, 2, 1),
                (1, 0, 0),
                (1, 0, 1)
            ]
        );
    }

    /// The transcription above must follow the CUDA source: if `scheduler.cuh` changes its
    /// decode, this test names the line that moved.
    #[test]
    fn decode_matches_the_engine_source() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../comet-kernels/cuda/sm90/scheduler.cuh");
        let Ok(src) = std::fs::read_to_string(&path) else {
            // Outside the workspace (a packaged crate) there is no engine source to compare.
            return;
        };
        let squeeze = |s: &str| s.split_whitespace().collect::<String>();
        let src = squeeze(&src);
        for line in [
            "const int q = c / n_tiles;",
            "if (s_pref[mid] <= q) lo = mid; else hi = mid;",
            "local = c - s_pref[e] * n_tiles;",
            "const int band = local / (BAND * n_tiles);",
            "const int r = local - band * BAND * n_tiles;",
            "const int g = min(BAND, mt - band * BAND);",
            "const int ge = g & ~1;",
            "if (r < ge * n_tiles) {",
            "n = r / ge;",
            "m = band * BAND + (r - n * ge);",
            "n = r - ge * n_tiles;",
            "m = band * BAND + g - 1;",
            "if (c < 0 || c >= total) return false;",
        ] {
            assert!(
                src.contains(&squeeze(line)),
                "scheduler.cuh no longer contains `{line}`: update CanonicalTiles"
            );
        }
    }

    #[test]
    fn engine_order_pads_and_checks() {
        let c = CanonicalTiles::new(&[2], 1, 16).unwrap();
        assert_eq!(
            c.engine_order([(0, 1, 0), (0, 0, 0)], 4).unwrap(),
            vec![1, 0, -1, -1]
        );
        assert!(matches!(
            c.engine_order([(0, 1, 0), (0, 0, 0)], 1),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            c.engine_order([(0, 2, 0)], 4),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn interleaved_expansion_cuts_runs() {
        let ms = [(0, 'a'), (0, 'a'), (0, 'a'), (1, 'a'), (1, 'b')];
        let same = |x: &(i32, char), y: &(i32, char)| x == y;
        let got = NOrder::Interleaved { band: 2 }.expand(&ms, 0..2, same);
        assert_eq!(
            got,
            vec![
                (0, 0),
                (1, 0),
                (0, 1),
                (1, 1),
                (2, 0),
                (2, 1),
                (3, 0),
                (3, 1),
                (4, 0),
                (4, 1)
            ]
        );
        let t = NOrder::Together.expand(&ms[..2], 3..5, same);
        assert_eq!(t, vec![(0, 3), (0, 4), (1, 3), (1, 4)]);
        assert!(NOrder::Interleaved { band: 0 }.validate().is_err());
    }
}
