use clap::Parser;

fn main() -> std::process::ExitCode {
    awnet_lab::tune_runtime();
    let cli = awnet_lab::cli::Cli::parse();
    let command = cli.command.unwrap_or(awnet_lab::cli::Command::Gui(Default::default()));
    match awnet_lab::cli::run(command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
