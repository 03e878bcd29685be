//! TMA descriptors: `CUtensorMap` encoded on the host with `cuTensorMapEncodeTiled`.

use std::ffi::c_void;

use cudarc::driver::{DriverError, sys};

use crate::buffer::DType;
use crate::error::{Error, Result};

/// A TMA descriptor (`CUtensorMap`, 128 bytes, 128-byte aligned), passed by value inside a
/// kernel's `__grid_constant__` parameter block so that its address lies in parameter space.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct TmaDescriptor(pub sys::CUtensorMap);

impl TmaDescriptor {
    /// An all-zero descriptor for a map the kernel never reads (its configuration has no
    /// use for it, e.g. C without the TMA-store epilogue).
    pub fn unused() -> Self {
        TmaDescriptor(sys::CUtensorMap { opaque: [0; 16] })
    }
}

impl std::fmt::Debug for TmaDescriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TmaDescriptor(..)")
    }
}

/// Shape of a tiled tensor map: innermost dimension first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileMap {
    /// Extent of each dimension, in elements.
    pub dims: Vec<u64>,
    /// Byte stride of dimensions 1.. (dimension 0 is contiguous).
    pub strides: Vec<u64>,
    /// Box (tile) extent per dimension, in elements.
    pub box_dims: Vec<u32>,
}

impl TileMap {
    /// Checks the limits of `cuTensorMapEncodeTiled` with a 128-byte swizzle for `elem`
    /// (the driver would only answer `CUDA_ERROR_INVALID_VALUE`).
    pub fn check(&self, what: &str, elem: DType, address: u64) -> Result<()> {
        let rank = self.dims.len();
        let esize = elem.size() as u64;
        if !(1..=5).contains(&rank) || self.box_dims.len() != rank || self.strides.len() + 1 != rank
        {
            return Err(Error::Invalid(format!(
                "{what}: tensor map of rank {rank} with {} strides and {} box dims",
                self.strides.len(),
                self.box_dims.len()
            )));
        }
        if !matches!(elem, DType::BF16 | DType::F16 | DType::F32) {
            return Err(Error::DType {
                what: what.to_string(),
                got: elem.to_string(),
                expected: "bf16, f16 or f32".to_string(),
            });
        }
        if address % 16 != 0 {
            return Err(Error::Alignment {
                what: format!("{what}: device address"),
                value: address as usize,
                multiple: 16,
                why: "TMA global addresses",
            });
        }
        for (i, &d) in self.dims.iter().enumerate() {
            if d == 0 || d > 1 << 32 {
                return Err(Error::limit(
                    format!("{what}: tensor map dimension {i}"),
                    d as usize,
                    "1..=2^32",
                ));
            }
        }
        for (i, &s) in self.strides.iter().enumerate() {
            if s % 16 != 0 {
                return Err(Error::Alignment {
                    what: format!("{what}: byte stride of dimension {}", i + 1),
                    value: s as usize,
                    multiple: 16,
                    why: "TMA global strides",
                });
            }
            if s >= 1 << 40 {
                return Err(Error::limit(
                    format!("{what}: byte stride of dimension {}", i + 1),
                    s as usize,
                    "2^40",
                ));
            }
        }
        for (i, &b) in self.box_dims.iter().enumerate() {
            if b == 0 || b > 256 {
                return Err(Error::limit(
                    format!("{what}: box dimension {i}"),
                    b as usize,
                    "1..=256",
                ));
            }
        }
        if self.box_dims[0] as u64 * esize > 128 {
            return Err(Error::limit(
                format!("{what}: inner box bytes"),
                (self.box_dims[0] as u64 * esize) as usize,
                "128 (the swizzle span)",
            ));
        }
        Ok(())
    }

    /// Encodes the map over device memory at `address` (bf16/f16/f32, 128-byte swizzle, zero
    /// fill out of bounds, 256-byte L2 promotion). Needs the CUDA driver; no context work.
    pub fn encode(&self, what: &str, elem: DType, address: u64) -> Result<TmaDescriptor> {
        self.check(what, elem, address)?;
        let dtype = match elem {
            DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
            DType::F32 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
            _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        };
        let elem_strides = [1u32; 5];
        let mut map = sys::CUtensorMap { opaque: [0; 16] };
        // SAFETY: every pointer refers to a live local array of at least `rank` (or rank - 1
        // for the strides) elements, checked above; the driver only reads them and writes the
        // 128-byte map. The global address is only recorded, not dereferenced.
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                dtype,
                self.dims.len() as u32,
                address as *mut c_void,
                self.dims.as_ptr(),
                self.strides.as_ptr(),
                self.box_dims.as_ptr(),
                elem_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            tracing::warn!(what, map = ?self, "cuTensorMapEncodeTiled failed");
            return Err(Error::Driver(DriverError(r)));
        }
        Ok(TmaDescriptor(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map2(k: u64, rows: u64) -> TileMap {
        TileMap {
            dims: vec![k, rows],
            strides: vec![k * 2],
            box_dims: vec![64, 128],
        }
    }

    #[test]
    fn descriptor_layout_matches_cutensormap() {
        assert_eq!(std::mem::size_of::<TmaDescriptor>(), 128);
        assert_eq!(std::mem::align_of::<TmaDescriptor>(), 128);
    }

    #[test]
    fn valid_maps_pass() {
        map2(4096, 16384).check("A", DType::BF16, 256).unwrap();
        map2(1000, 3).check("A", DType::F16, 0).unwrap();
        let m4 = TileMap {
            dims: vec![4096, 14336, 2, 8],
            strides: vec![8192, 8192 * 14336, 2 * 8192 * 14336],
            box_dims: vec![64, 128, 1, 1],
        };
        m4.check("B", DType::BF16, 1 << 20).unwrap();
    }

    #[test]
    fn bad_maps_name_the_value() {
        // K = 1001: row stride 2002 bytes is not a multiple of 16.
        let e = map2(1001, 8).check("A", DType::BF16, 0).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Alignment {
                    value: 2002,
                    multiple: 16,
                    ..
                }
            ),
            "{e}"
        );
        let e = map2(64, 8).check("A", DType::BF16, 8).unwrap_err();
        assert!(matches!(e, Error::Alignment { value: 8, .. }), "{e}");
        let mut m = map2(64, 8);
        m.box_dims[1] = 512;
        assert!(matches!(
            m.check("A", DType::BF16, 0),
            Err(Error::Limit { value: 512, .. })
        ));
        let mut m = map2(64, 8);
        m.box_dims[0] = 128; // 256 bytes > the 128-byte swizzle span
        assert!(matches!(
            m.check("A", DType::BF16, 0),
            Err(Error::Limit { value: 256, .. })
        ));
        assert!(matches!(
            map2(64, 8).check("A", DType::I32, 0),
            Err(Error::DType { .. })
        ));
        // f32 (the TMA-store epilogue's C): 32 columns fill the 128-byte swizzle span.
        assert!(matches!(
            map2(64, 8).check("C", DType::F32, 0),
            Err(Error::Limit { value: 256, .. })
        ));
        let mut m = map2(64, 8);
        m.box_dims[0] = 32;
        m.check("C", DType::F32, 0).unwrap();
        let m = TileMap {
            dims: vec![64],
            strides: vec![128],
            box_dims: vec![64],
        };
        assert!(matches!(
            m.check("A", DType::BF16, 0),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            map2(64, 0).check("A", DType::BF16, 0),
            Err(Error::Limit { value: 0, .. })
        ));
    }
}
