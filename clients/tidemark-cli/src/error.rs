//! What went wrong, what to do next, and the exit code that says it.

use std::process::ExitCode;

use tidemark_client::ClientError;
use tonic::Code;

/// Exit codes (documented in `tidemark --help` and the README).
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_PRECONDITION: u8 = 4;
pub const EXIT_UNAVAILABLE: u8 = 5;
/// The operation ran and did not succeed: a run FAILED, a verification did
/// not pass, a cut-over aborted (cleanly).
pub const EXIT_OPERATION_FAILED: u8 = 6;
pub const EXIT_CONFIG: u8 = 64;
pub const EXIT_INVALID: u8 = 65;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The config file, a context or a file it names is unusable.
    #[error(transparent)]
    Config(#[from] crate::target::ConfigError),
    /// An argument or plan that cannot be sent; `hint` says how to fix it.
    #[error("{message}")]
    Invalid { message: String, hint: String },
    /// The operation ran and did not succeed; `hint` says what to do next.
    #[error("{message}")]
    Failed { message: String, hint: String },
}

impl CliError {
    pub fn invalid(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub fn failed(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Failed {
            message: message.into(),
            hint: hint.into(),
        }
    }
}

impl From<tidemark_client::SpecError> for CliError {
    fn from(e: tidemark_client::SpecError) -> Self {
        Self::invalid(
            e.to_string(),
            "see `tidemark help <command>` for the accepted forms",
        )
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        Self::Client(ClientError::Rpc(s))
    }
}

pub type CliResult = Result<(), CliError>;

/// Prints what went wrong and what to do next; returns the exit code.
pub fn report(err: &CliError, endpoint: &str) -> ExitCode {
    let err = match err {
        CliError::Client(e) => e,
        CliError::Config(e) => {
            eprintln!("error: {e}");
            eprintln!(
                "hint: contexts live in the config file (--config, TIDEMARK_CONFIG); see `tidemark help`"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        CliError::Invalid { message, hint } | CliError::Failed { message, hint } => {
            eprintln!("error: {message}");
            if !hint.is_empty() {
                eprintln!("hint: {hint}");
            }
            return ExitCode::from(if matches!(err, CliError::Invalid { .. }) {
                EXIT_INVALID
            } else {
                EXIT_OPERATION_FAILED
            });
        }
    };
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
                    "is Tidemark running there? start one with `tidemark dev`, or pass --endpoint (or --job-tracker, --replicator, --verifier, --stats-aggregator, --context)",
                ),
                Code::Unauthenticated => (EXIT_FAILURE, "pass --token or set TIDEMARK_TOKEN"),
                Code::AlreadyExists => (
                    EXIT_PRECONDITION,
                    "the name is taken by another definition: pick another name, or repeat the same definition",
                ),
                Code::DeadlineExceeded => (
                    EXIT_OPERATION_FAILED,
                    "it did not finish in time; `tidemark replicate lag NAME` or `tidemark jobs show JOB` shows where it stands",
                ),
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
        ClientError::Cutover(e) => {
            eprintln!("error: {e}");
            eprintln!(
                "hint: fix the cause of step {}, then run the plan again (finished steps are reused: the pipeline is kept); `tidemark cutover PLAN --dry-run` re-checks the preconditions",
                e.step
            );
            ExitCode::from(EXIT_OPERATION_FAILED)
        }
        ClientError::Timeout { .. } => {
            eprintln!("error: {err}");
            eprintln!(
                "hint: the work goes on in the services; follow it with `tidemark jobs show`, or wait longer with --timeout"
            );
            ExitCode::from(EXIT_OPERATION_FAILED)
        }
        ClientError::Spec(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_INVALID)
        }
        ClientError::Endpoint { .. } => {
            eprintln!("error: {err}");
            ExitCode::from(EXIT_CONFIG)
        }
        other => {
            eprintln!("error: {other}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
