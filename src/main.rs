use std::process::ExitCode;

use clap::Parser;
use pmesh_dev::cli::{self, Cli, Command};
use pmesh_dev::guardian;

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == guardian::SUBCOMMAND)
    {
        guardian::run();
    }
    let cli = Cli::parse();
    if matches!(cli.command, Command::Watch { .. } | Command::Run { .. }) {
        // Short commands (`hash`, `build`) keep the allocator's default.
        pmesh_dev::sys::limit_heap_arenas();
        pmesh_dev::proxy::raise_fd_limit();
    }
    match cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
