//! comet-bench (placeholder; see DESIGN).
