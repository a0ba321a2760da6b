//! `metaguard`: the binary. Thin: parse the command line, dispatch, print
//! the error chain and map it to the documented exit codes
//! (0 ok · 1 drift or problems found · 2 usage, config or permission
//! error — and then nothing in the kernel changed).

#![forbid(unsafe_code)]

mod cli;
mod daemon;
mod discovery;
mod doctor;
mod enforce;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
