//! `tidemark completions SHELL` and `tidemark man`: generated from the same
//! clap definition the binary parses, so they never drift from it.

use std::io::Write;
use std::process::ExitCode;

use clap::CommandFactory;

use crate::cli::Cli;

/// Writes the completion script of `shell` to `out`.
pub fn write_completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "tidemark", out);
}

/// Writes the man page (roff) to `out`.
///
/// # Errors
/// When `out` cannot be written.
pub fn write_man(out: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out)
}

/// `tidemark completions SHELL`.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut script = Vec::new();
    write_completions(shell, &mut script);
    print(&script)
}

/// `tidemark man`.
pub fn man() -> ExitCode {
    let mut page = Vec::new();
    write_man(&mut page).expect("writing to memory does not fail");
    print(&page)
}

/// Writes `bytes` to stdout; a reader that stops early (`| head`) is fine.
fn print(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bash_completion_knows_the_commands_and_the_service_flags() {
        let mut out = Vec::new();
        write_completions(clap_complete::Shell::Bash, &mut out);
        let script = String::from_utf8(out).expect("UTF-8");
        for word in [
            "backfill-attribute",
            "migrate-units",
            "cutover",
            "replicate",
            "completions",
            "--job-tracker",
            "--stats-aggregator",
            "--context",
        ] {
            assert!(script.contains(word), "no {word} in the bash completion");
        }
    }

    #[test]
    fn the_man_page_has_a_name_section_and_the_commands() {
        let mut out = Vec::new();
        write_man(&mut out).expect("render");
        let page = String::from_utf8(out).expect("UTF-8");
        assert!(page.contains(".SH NAME"), "{page}");
        assert!(page.contains("tidemark"), "{page}");
        assert!(page.contains("backfill\\-attribute"), "{page}");
    }
}
