use std::process::ExitCode;

use clap::Parser;
use pmesh_dev::cli::{self, Cli};
use pmesh_dev::guardian;

/// glibc gives every thread that allocates its own heap arena, up to eight per core. A watch
/// holds its tree for hours, and the walk that built it ran on several threads: what each left
/// in its arena pins pages the heap cannot give back (about 4 MB on a 100k-file tree). Two
/// arenas cost the walk nothing measurable on this machine and keep that memory together.
fn limit_heap_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; it is called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    limit_heap_arenas();
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
