//! The `sfron` binary: parse → run → exit code. See the library for the rest.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sfron::cli::Cli::parse();
    let code = sfron::app::run(cli);
    ExitCode::from(u8::try_from(code).unwrap_or(2))
}
