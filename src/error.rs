//! The one error type; its kinds map one to one onto the C ABI's status codes.

use std::fmt;

/// What went wrong, with a message that names the argument or the state at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// An argument is out of its domain (null, NaN, out-of-range enum, overlap, ...).
    InvalidArgument(String),
    /// The call is not allowed in the optimizer's current state (protocol misuse).
    BadState(String),
    /// No CUDA driver or no such device.
    NoDevice(String),
    /// A CUDA driver, NVRTC or kernel failure.
    Cuda(String),
    /// An allocation failed.
    OutOfMemory(String),
    /// Reading or writing a file failed.
    Io(String),
    /// A bug in hyzo (a caught panic, a broken invariant).
    Internal(String),
}

impl Error {
    /// The message without the kind.
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidArgument(m)
            | Error::BadState(m)
            | Error::NoDevice(m)
            | Error::Cuda(m)
            | Error::OutOfMemory(m)
            | Error::Io(m)
            | Error::Internal(m) => m,
        }
    }

    /// The same kind of error with the message `f` makes of this one's.
    pub(crate) fn map_message(self, f: impl FnOnce(&str) -> String) -> Self {
        let m = f(self.message());
        match self {
            Error::InvalidArgument(_) => Error::InvalidArgument(m),
            Error::BadState(_) => Error::BadState(m),
            Error::NoDevice(_) => Error::NoDevice(m),
            Error::Cuda(_) => Error::Cuda(m),
            Error::OutOfMemory(_) => Error::OutOfMemory(m),
            Error::Io(_) => Error::Io(m),
            Error::Internal(_) => Error::Internal(m),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Error::InvalidArgument(_) => "invalid argument",
            Error::BadState(_) => "bad state",
            Error::NoDevice(_) => "no device",
            Error::Cuda(_) => "CUDA error",
            Error::OutOfMemory(_) => "out of memory",
            Error::Io(_) => "I/O error",
            Error::Internal(_) => "internal error",
        };
        write!(f, "{kind}: {}", self.message())
    }
}

impl std::error::Error for Error {}

/// hyzo's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for an [`Error::InvalidArgument`].
pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::InvalidArgument(msg.into()))
}

/// Shorthand for an [`Error::BadState`].
pub(crate) fn bad_state<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::BadState(msg.into()))
}
