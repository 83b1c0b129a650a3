//! `nudge bench`, handed over to the `nudge-bench` program.

use std::path::PathBuf;
use std::process::ExitCode;

/// `nudge bench`: the bench is a program of its own (`bench/`), so the
/// daemon carries none of it; this hands over to the `nudge-bench` built
/// next to this binary, with `--config` and the arguments as given.
pub(crate) fn run_bench(config: Option<PathBuf>, args: Vec<std::ffi::OsString>) -> ExitCode {
    let bench = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(format!("nudge-bench{}", std::env::consts::EXE_SUFFIX)),
        Err(e) => {
            eprintln!("nudge: cannot tell where this program is, to find nudge-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !bench.is_file() {
        eprintln!(
            "nudge: `nudge bench` runs {}, which is not there: build it with \
             `cargo build --release -p nudge-bench` (or `cargo build --release`, \
             which builds the whole workspace), or run `cargo run --release -p nudge-bench -- ARGS`",
            bench.display()
        );
        return ExitCode::FAILURE;
    }
    let mut cmd = std::process::Command::new(&bench);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Replaces this process: signals, exit code and output are the bench's own.
        let e = cmd.exec();
        eprintln!("nudge: cannot run {}: {e}", bench.display());
        ExitCode::FAILURE
    }
    #[cfg(not(unix))]
    match cmd.status() {
        Ok(s) => ExitCode::from(s.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("nudge: cannot run {}: {e}", bench.display());
            ExitCode::FAILURE
        }
    }
}
