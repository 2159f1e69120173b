use clap::{CommandFactory, Parser};

/// Keeps freed tensor buffers in the heap instead of returning them to the kernel: candle
/// allocates and frees large buffers on every op, and glibc's default (mmap above 128 KiB, trim
/// on free) turns each into page faults.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = awnet_lab::cli::Cli::parse();
    let Some(command) = cli.command else {
        // The window (issue 5) is not built yet; until it is, no command shows the help.
        let _ = awnet_lab::cli::Cli::command().print_help();
        return std::process::ExitCode::SUCCESS;
    };
    match awnet_lab::cli::run(command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
