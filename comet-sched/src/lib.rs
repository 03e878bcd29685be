//! comet-sched (placeholder; see DESIGN).
