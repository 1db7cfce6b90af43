//! Errors of the client library.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The OS error is in the message and deliberately not a `source`: error chains would print
    /// it twice.
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid model config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unreadable weights {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("missing weight {0:?} in the model files")]
    MissingWeight(String),
    #[error(
        "weight {name:?} has shape {found:?}, but the model's config implies {expected:?}: the config and the weights do not belong together"
    )]
    WeightShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("data error in {path} line {line}: {message}")]
    Data {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("not enough data: {0}")]
    NotEnoughData(String),
    #[error(transparent)]
    Adapter(#[from] fedlora_proto::adapter::AdapterError),
    #[error("coordinator refused the call: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("cannot reach the coordinator: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(
        "the coordinator refused this site's certificate (tls alert {alert}): {detail}; ask the federation's operator for a new one (`fedlora ca issue-client`) and pass it with --cert and --key"
    )]
    CertificateRefused { alert: String, detail: String },
    #[error("compute thread: {0}")]
    Compute(#[from] crate::compute::ComputeError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The model's loss is not a finite number: training diverged (a learning rate too high for
    /// the model and data), or the adapter it starts from makes the model overflow.
    #[error("diverged: {0}")]
    Diverged(String),
    /// A run stopped on request (Ctrl-C, SIGTERM); the message says what it saved, if anything.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

impl ClientError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |error| Self::Io { path, error }
    }

    /// As [`ClientError::io`], for an error while writing `path`.
    pub(crate) fn io_write(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |error| Self::Write { path, error }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
