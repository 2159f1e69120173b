use clap::{CommandFactory, Parser};

fn main() -> std::process::ExitCode {
    awnet_lab::tune_allocator();
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
