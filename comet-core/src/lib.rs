//! comet-core (placeholder; see DESIGN).
