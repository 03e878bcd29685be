//! comet-layer (placeholder; see DESIGN).
