//! `cargo xtask ci`: the CI sequence. `.ci/run` runs the same three commands (a test below
//! keeps the two in step).

use crate::util::{cargo, run_status};
use anyhow::Result;
use std::time::Instant;

/// Arguments of `cargo xtask ci`.
#[derive(clap::Args, Debug)]
pub struct CiArgs {
    /// Run every step even after one fails (the default stops at the first failure).
    #[arg(long)]
    pub no_fail_fast: bool,
}

/// One CI step: a name and the `cargo` arguments.
pub struct Step {
    pub name: &'static str,
    pub args: &'static [&'static str],
}

/// The CI sequence, in order. `cargo test --workspace` is THE test command (README).
pub const STEPS: &[Step] = &[
    Step {
        name: "fmt",
        args: &["fmt", "--all", "--", "--check"],
    },
    Step {
        name: "clippy",
        args: &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    },
    Step {
        name: "test",
        args: &["test", "--workspace"],
    },
];

/// Run the CI steps and print a summary; an error if any failed.
pub fn run(args: &CiArgs) -> Result<()> {
    let mut results = Vec::new();
    for step in STEPS {
        let start = Instant::now();
        let outcome = run_status(cargo().args(step.args));
        let secs = start.elapsed().as_secs_f64();
        let failed = outcome.is_err();
        results.push((step.name, secs, outcome));
        if failed && !args.no_fail_fast {
            break;
        }
    }
    eprintln!("\nci summary:");
    let mut failures = Vec::new();
    for (name, secs, outcome) in &results {
        match outcome {
            Ok(()) => eprintln!("  ok      {name:<7} {secs:7.1} s"),
            Err(err) => {
                eprintln!("  FAILED  {name:<7} {secs:7.1} s  {err}");
                failures.push(*name);
            }
        }
    }
    for step in &STEPS[results.len()..] {
        eprintln!("  skipped {}", step.name);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("ci failed: {}", failures.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::workspace_root;

    /// `.ci/run` and `cargo xtask ci` must run the same commands, in the same order.
    #[test]
    fn ci_script_runs_the_same_steps_in_order() {
        let script = std::fs::read_to_string(workspace_root().join(".ci/run")).unwrap();
        let mut last = 0;
        for step in STEPS {
            let line = format!("cargo {}", step.args.join(" "));
            let at = script
                .find(&line)
                .unwrap_or_else(|| panic!(".ci/run lacks `{line}`"));
            assert!(at >= last, "`{line}` is out of order in .ci/run");
            last = at;
        }
        assert!(script.contains("set -euo pipefail"));
    }

    #[test]
    fn readme_names_the_test_command() {
        let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
        assert!(readme.contains("cargo test --workspace"));
        assert!(readme.contains(".ci/run"));
    }
}
