use clap::Parser;

use aegis_audit::cli::{Cli, LogFormat};

mod commands;

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // One line an operator can act on: what failed and why, outermost first.
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            std::process::ExitCode::from(2)
        }
    }
}

/// glibc's malloc raises its mmap threshold whenever a large block is freed; after that, large
/// buffers (a flush's Arrow arrays and Parquet output) come from the heap, fragment it, and stay
/// resident after the flush. A fixed threshold keeps them mapped, so each flush's memory goes
/// back to the OS; fewer arenas keep per-thread free lists from holding more.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; called once, before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn init_tracing(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,rdkafka=warn,aws=warn".into());
    use std::io::IsTerminal;
    // Colour only on a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
