//! comet-kernels (placeholder; see DESIGN).
