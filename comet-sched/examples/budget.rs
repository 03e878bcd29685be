//! What the cost model predicts for the paper's presets: the best communication-block
//! budget of each fused layer on H200s, and how the fused layer compares with its GEMM alone
//! and its communication alone. Random uniform top-k routing, 8192 tokens per rank.
//!
//! `cargo run --release -p comet-sched --example budget [tokens_per_rank]`

use comet_core::{Preset, RoutingPlan};
use comet_sched::budget::{choose_n_comm_layer0, choose_n_comm_layer1};
use comet_sched::layer0::{Chunking, Layer0Options, Layer0Schedule};
use comet_sched::layer1::{Layer1Options, Layer1Schedule, ReducePlan};
use comet_sched::model::CostModel;
use comet_sched::sim::{Layer0Work, Layer1Work, simulate_layer0, simulate_layer1};
use comet_sched::tile::{NOrder, TileShape};
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tokens: usize = std::env::args().nth(1).map_or(Ok(8192), |a| a.parse())?;
    let model = CostModel::h200();
    let no_gemm = CostModel {
        gemm_tflops: 1e9,
        ..model
    };
    println!(
        "{:<16} {:>2} | {:>7} {:>9} {:>9} {:>9} | {:>7} {:>9} {:>9} {:>9}",
        "preset",
        "W",
        "L0 comm",
        "fused us",
        "gemm us",
        "comm us",
        "L1 comm",
        "fused us",
        "gemm us",
        "comm us"
    );
    for &preset in Preset::all() {
        let (h, f, e, k) = preset.shape();
        for world in [2usize, 8] {
            let mut rng = StdRng::seed_from_u64(7);
            let ids: Vec<Array2<u32>> = (0..world)
                .map(|_| {
                    let mut a = Array2::<u32>::zeros((tokens, k));
                    let mut pool: Vec<u32> = (0..e as u32).collect();
                    for t in 0..tokens {
                        // A partial shuffle: k distinct experts.
                        for j in 0..k {
                            let p = rng.random_range(j..e);
                            pool.swap(j, p);
                            a[[t, j]] = pool[j];
                        }
                    }
                    a
                })
                .collect();
            let views: Vec<_> = ids.iter().map(|a| a.view()).collect();
            let plan = RoutingPlan::new(&views, e, world)?;
            let d = 0;
            let l0 = Layer0Schedule::from_plan(
                &plan,
                d,
                Layer0Options {
                    // The sm90 engine's 128x256 SwiGLU tile writes 128 activation columns.
                    tile: TileShape::new(128, 128, f)?,
                    chunking: Chunking::Rows(128),
                    n_order: NOrder::Interleaved { band: 2 },
                },
            )?;
            let w0 = Layer0Work {
                hidden: h,
                acc_factor: 2,
                elem_bytes: 2,
            };
            let c0 = choose_n_comm_layer0(&l0, &w0, &model)?;
            let comm0 = simulate_layer0(&l0, &w0, c0.n_comm, &no_gemm)?.comm_end_us;
            let (layouts, reduce) = ReducePlan::all(&plan)?;
            let l1 = Layer1Schedule::from_plan(
                &plan,
                d,
                Layer1Options::new(TileShape::new(128, 256, h)?),
            )?;
            let w1 = Layer1Work {
                ffn: f,
                elem_bytes: 2,
                owner_rows: layouts[d].rows(),
                tokens,
            };
            let c1 = choose_n_comm_layer1(&l1, &reduce[d], &w1, &model)?;
            let comm1 = simulate_layer1(&l1, &reduce[d], &w1, c1.n_comm, &no_gemm)?.comm_end_us;
            println!(
                "{:<16} {:>2} | {:>7} {:>9.0} {:>9.0} {:>9.0} | {:>7} {:>9.0} {:>9.0} {:>9.0}",
                preset.name(),
                world,
                c0.n_comm,
                c0.report.total_us,
                c0.report.gemm_only_us,
                comm0,
                c1.n_comm,
                c1.report.total_us,
                c1.report.gemm_only_us,
                comm1
            );
        }
    }
    Ok(())
}
