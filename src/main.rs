use std::process::ExitCode;

use clap::Parser;
use pmesh_dev::cli::{self, Cli};
use pmesh_dev::guardian;

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == guardian::SUBCOMMAND)
    {
        guardian::run();
    }
    match cli::run(Cli::parse()) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
