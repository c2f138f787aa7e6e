//! Output formats and exit codes shared by every command.

use std::process::ExitCode;

use tidemark_client::ClientError;
use tonic::Code;

/// `--output`: text for people, JSON for scripts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Text,
    Json,
}

impl Output {
    pub fn print(self, json: &serde_json::Value, text: impl FnOnce() -> String) {
        match self {
            Self::Json => println!(
                "{}",
                serde_json::to_string_pretty(json).expect("JSON values serialise")
            ),
            Self::Text => print!("{}", text()),
        }
    }
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", parts.join("  ").trim_end())
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// Exit codes (documented in `tidemark --help` and the README).
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_PRECONDITION: u8 = 4;
pub const EXIT_UNAVAILABLE: u8 = 5;
pub const EXIT_INVALID: u8 = 65;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        Self::Client(ClientError::Rpc(s))
    }
}

pub type CliResult = Result<(), CliError>;

/// Prints what went wrong and what to do next; returns the exit code.
pub fn report(err: &CliError, endpoint: &str) -> ExitCode {
    let CliError::Client(err) = err;
    match err {
        ClientError::Rpc(status) => {
            let (code, hint) = match status.code() {
                Code::NotFound => (
                    EXIT_NOT_FOUND,
                    "check the name; `tidemark jobs ls` lists what exists",
                ),
                Code::FailedPrecondition => (
                    EXIT_PRECONDITION,
                    "the current state does not allow this; see `tidemark jobs show`",
                ),
                Code::InvalidArgument => (EXIT_INVALID, "fix the argument named above"),
                Code::Unavailable => (
                    EXIT_UNAVAILABLE,
                    "is Tidemark running there? start one with `tidemark dev`, or pass --endpoint",
                ),
                Code::Unauthenticated => (EXIT_FAILURE, "pass --token or set TIDEMARK_TOKEN"),
                _ => (EXIT_FAILURE, ""),
            };
            eprintln!(
                "error: {} ({:?}) from {endpoint}",
                status.message(),
                status.code()
            );
            if !hint.is_empty() {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(code)
        }
        other => {
            eprintln!("error: {other}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
