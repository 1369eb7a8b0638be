//! Progress bars and logging that `--quiet` silences in one place.

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Sets up tracing (to stderr, `RUST_LOG` overrides the level) unless quiet.
pub fn init(quiet: bool, verbose: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
    if quiet {
        return;
    }
    let default = if verbose { "paft=debug,info" } else { "info" };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

pub fn is_quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// A bar over `len` steps (hidden when quiet; indicatif hides it when stderr is not a terminal).
pub fn bar(len: u64, label: &str) -> ProgressBar {
    if is_quiet() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(label.to_string());
    pb
}
