//! comet-comm (placeholder; see DESIGN).
