//! Small helpers shared by the subcommands: workspace root, running commands, file tails.

use anyhow::{Context, Result, bail};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// A `cargo` command (the one that runs us, when known) started in the workspace root.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    cmd
}

/// Render a command line for logs: program and arguments, space separated.
pub fn display_cmd(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(shell_word));
    parts.join(" ")
}

fn shell_word(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Run a command with inherited stdio, echoing it first; an error names the command and
/// its exit status.
pub fn run_status(cmd: &mut Command) -> Result<()> {
    let line = display_cmd(cmd);
    eprintln!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Run a command and capture its stdout (stderr is inherited, so build errors show).
pub fn run_stdout(cmd: &mut Command) -> Result<String> {
    let line = display_cmd(cmd);
    eprintln!("$ {line}");
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed ({})", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}

/// The last `n` lines of a text file (empty if it cannot be read).
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Human-readable byte count (MiB with one decimal).
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
pub mod testdir {
    //! Throw-away directories for tests (no extra crate needed).
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    /// A fresh empty directory under the system temp dir, removed on drop.
    pub struct TestDir(PathBuf);

    impl TestDir {
        pub fn new(tag: &str) -> Self {
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let dir = std::env::temp_dir().join(format!(
                "xtask-test-{tag}-{}-{n}-{}",
                std::process::id(),
                super::unix_now()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Write an executable script.
    pub fn script(path: &Path, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, body).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_cmd_quotes_only_when_needed() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--workspace", "a b", "it's"]);
        assert_eq!(display_cmd(&cmd), r"cargo test --workspace 'a b' 'it'\''s'");
    }

    #[test]
    fn tail_lines_keeps_the_end() {
        let dir = testdir::TestDir::new("tail");
        let f = dir.path().join("log");
        std::fs::write(&f, "1\n2\n3\n4\n").unwrap();
        assert_eq!(tail_lines(&f, 2), "3\n4");
        assert_eq!(tail_lines(&f, 10), "1\n2\n3\n4");
        assert_eq!(tail_lines(&dir.path().join("missing"), 3), "");
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let text = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(text.contains("[workspace]"));
    }
}
