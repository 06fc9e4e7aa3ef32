//! `sprig`: run, chat with, convert, inspect and evaluate small language models.

mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    // Errors are one line on stderr and a non-zero exit code; panics are turned into the same.
    let result = std::panic::catch_unwind(|| commands::dispatch(cli));
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("sprig: error: {msg}");
            ExitCode::from(1)
        }
        Err(_) => {
            eprintln!("sprig: error: internal error (panic); please report it");
            ExitCode::from(101)
        }
    }
}
