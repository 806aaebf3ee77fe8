use std::process::ExitCode;

use clap::Parser;
use pmesh_dev::cli::{self, Cli, Command};
use pmesh_dev::guardian;

/// glibc gives every thread that allocates its own heap arena, up to eight per core. A watch
/// holds its tree for hours, and the walk that built it ran on several threads: what each left
/// in its arena pins pages the heap cannot give back (about 4 MB on a 100k-file tree). Two
/// arenas keep that memory together; short commands (`hash`, `build`) keep glibc's default.
fn limit_heap_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; it is called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == guardian::SUBCOMMAND)
    {
        guardian::run();
    }
    let cli = Cli::parse();
    if matches!(cli.command, Command::Watch { .. } | Command::Run { .. }) {
        limit_heap_arenas();
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
