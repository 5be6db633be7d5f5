//! What the `cachegw` subcommands print on standard output.
//!
//! Rust ignores SIGPIPE, so writing to a pipe whose reader has gone fails
//! with `BrokenPipe`, and `println!` turns that into a panic (`cachegw token
//! new | head -n 1`). The subcommands print through [`outln!`](crate::outln)
//! and [`out!`](crate::out) instead. A reader that stopped reading is how
//! pipelines normally end, not an error: the rest of the output is dropped
//! quietly and the command exits with the status it would have had. Any
//! other write error (a full disk) is returned, naming standard output.

use std::io::{self, Write};

/// Writes `bytes` to standard output and flushes it.
pub fn write_bytes(bytes: &[u8]) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    ignore_closed_pipe(stdout.write_all(bytes).and_then(|()| stdout.flush()))
}

/// Writes formatted text to standard output and flushes it (what [`out!`](crate::out)
/// and [`outln!`](crate::outln) call).
pub fn write_fmt(text: std::fmt::Arguments<'_>) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    ignore_closed_pipe(stdout.write_fmt(text).and_then(|()| stdout.flush()))
}

fn ignore_closed_pipe(written: io::Result<()>) -> io::Result<()> {
    match written {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(err) => Err(io::Error::new(
            err.kind(),
            format!("cannot write to standard output: {err}"),
        )),
    }
}

/// `print!` for the subcommands: an `io::Result` instead of a panic, and a
/// closed pipe is not an error (see [`crate::cli_output`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli_output::write_fmt(format_args!($($arg)*))
    };
}

/// `println!` for the subcommands: an `io::Result` instead of a panic, and a
/// closed pipe is not an error (see [`crate::cli_output`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli_output::write_bytes(b"\n")
    };
    ($($arg:tt)*) => {
        $crate::cli_output::write_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_is_the_end_of_output_not_an_error() {
        let closed = io::Error::from(io::ErrorKind::BrokenPipe);
        assert!(ignore_closed_pipe(Err(closed)).is_ok());
        let full = io::Error::from(io::ErrorKind::StorageFull);
        let err = ignore_closed_pipe(Err(full)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert!(err.to_string().contains("standard output"), "{err}");
    }
}
