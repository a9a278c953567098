//! Standard output of the client commands. When the reader goes away
//! (`kinesin tail s | head`), writing fails with a broken pipe; the command
//! then stops quietly with status 0, as `cat` does in a pipeline, instead of
//! panicking as `println!` does.

use std::io::{ErrorKind, Write};

/// Standard output was closed by its reader: the command is done, not failed.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// A write to standard output failed: a closed pipe becomes [`StdoutClosed`].
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("cannot write to standard output")
    }
}

/// Writes one line to standard output.
pub fn line(args: std::fmt::Arguments) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(stdout_error)
}

/// `println!` for client commands: returns from the enclosing function with
/// an error when standard output is gone.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))?
    };
}
pub(crate) use outln;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_pipe_is_a_closed_stdout_and_other_errors_are_not() {
        let closed = stdout_error(std::io::Error::from(ErrorKind::BrokenPipe));
        assert!(closed.downcast_ref::<StdoutClosed>().is_some());
        let full = stdout_error(std::io::Error::from(ErrorKind::StorageFull));
        assert!(full.downcast_ref::<StdoutClosed>().is_none());
        assert!(full.to_string().contains("standard output"));
    }
}
