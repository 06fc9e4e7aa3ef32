//! `sprig`: run, chat with, convert, inspect and evaluate small language models.
#![forbid(unsafe_code)]

mod args;
mod cmd;

use std::process::ExitCode;
use std::sync::Mutex;

use clap::error::ErrorKind;
use clap::Parser;

static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);

fn main() -> ExitCode {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // No backtraces for users: a panic is recorded and reported as one line below.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        *PANIC_MESSAGE.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
    }));
    match std::panic::catch_unwind(|| args::dispatch(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
                return ExitCode::SUCCESS;
            }
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("sprig: error: {msg}");
            ExitCode::from(1)
        }
        Err(_) => {
            let msg = PANIC_MESSAGE.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
            // The reader of our output went away (e.g. `sprig inspect M | head`): not an error.
            if msg.contains("Broken pipe") {
                return ExitCode::SUCCESS;
            }
            eprintln!("sprig: error: internal error: {msg}");
            ExitCode::from(101)
        }
    }
}

/// `--help` and `--version` as clap prints them; any other parse error (an unknown flag, a value outside a
/// flag's list) as one line with exit code 1, like every other error.
fn usage_error(e: clap::Error) -> ExitCode {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    let text = e.render().to_string();
    let line: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect();
    let msg = line.join(" ");
    eprintln!("sprig: error: {}", msg.strip_prefix("error: ").unwrap_or(&msg));
    ExitCode::from(1)
}
