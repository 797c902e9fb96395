//! One error type for the core. Every error carries a stable `code` that the
//! binding forwards to JavaScript as `Error.code`.

use std::fmt;

/// Stable, machine-readable error codes (documented in the TypeScript facade).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// An input tensor has the wrong rank, shape or length.
    InvalidShape,
    /// An input tensor holds a value the model cannot use (NaN or infinite).
    InvalidInput,
    /// `maskRatio` is outside [0, 1) or does not suit the masking strategy.
    InvalidMaskRatio,
    /// Masking noise has the wrong shape or is not finite.
    InvalidNoise,
    /// A configuration value is missing, unknown or inconsistent.
    InvalidConfig,
    /// An option other than the above is invalid.
    InvalidArgument,
    /// The checkpoint path does not exist.
    CheckpointNotFound,
    /// The checkpoint cannot be parsed (corrupt, truncated or not a checkpoint).
    CheckpointCorrupt,
    /// The checkpoint has unknown keys or lacks required ones.
    CheckpointKeys,
    /// A checkpoint tensor's shape does not match the configuration.
    CheckpointShape,
    /// Reading or writing a file failed.
    Io,
    /// An image given to preprocessing is unusable: bytes that do not decode, a zero
    /// side, an unsupported channel count, or pixels that do not fill its size.
    InvalidImage,
    /// A training step's loss, gradient or update was NaN or infinite.
    NonFiniteLoss,
    /// The work was cancelled before it finished.
    Aborted,
    /// The model is training; no other call may use it until the run ends.
    Busy,
    /// The model was disposed: its weights are freed.
    Disposed,
    /// A valid request needs more memory than the process can allocate.
    OutOfMemory,
    /// Distributed training failed: no usable MPI library, a launcher that disagrees with
    /// it, an MPI error, or a collective that did not complete within the timeout.
    Distributed,
    /// A bug: the computation failed where valid input cannot make it fail.
    Internal,
}

impl ErrorCode {
    /// Every code, for checks that the facade knows each one.
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::InvalidShape,
        ErrorCode::InvalidInput,
        ErrorCode::InvalidMaskRatio,
        ErrorCode::InvalidNoise,
        ErrorCode::InvalidConfig,
        ErrorCode::InvalidArgument,
        ErrorCode::CheckpointNotFound,
        ErrorCode::CheckpointCorrupt,
        ErrorCode::CheckpointKeys,
        ErrorCode::CheckpointShape,
        ErrorCode::Io,
        ErrorCode::InvalidImage,
        ErrorCode::NonFiniteLoss,
        ErrorCode::Aborted,
        ErrorCode::Busy,
        ErrorCode::Disposed,
        ErrorCode::OutOfMemory,
        ErrorCode::Distributed,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidShape => "E_SHAPE",
            ErrorCode::InvalidInput => "E_INPUT",
            ErrorCode::InvalidMaskRatio => "E_MASK_RATIO",
            ErrorCode::InvalidNoise => "E_NOISE",
            ErrorCode::InvalidConfig => "E_CONFIG",
            ErrorCode::InvalidArgument => "E_ARGUMENT",
            ErrorCode::CheckpointNotFound => "E_CHECKPOINT_NOT_FOUND",
            ErrorCode::CheckpointCorrupt => "E_CHECKPOINT_CORRUPT",
            ErrorCode::CheckpointKeys => "E_CHECKPOINT_KEYS",
            ErrorCode::CheckpointShape => "E_CHECKPOINT_SHAPE",
            ErrorCode::Io => "E_IO",
            ErrorCode::InvalidImage => "E_IMAGE",
            ErrorCode::NonFiniteLoss => "E_NON_FINITE_LOSS",
            ErrorCode::Aborted => "E_ABORTED",
            ErrorCode::Busy => "E_BUSY",
            ErrorCode::Disposed => "E_DISPOSED",
            ErrorCode::OutOfMemory => "E_OUT_OF_MEMORY",
            ErrorCode::Distributed => "E_DISTRIBUTED",
            ErrorCode::Internal => "E_INTERNAL",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error { code, message: message.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

/// The binding hands an error's code to napi-rs as its status, which becomes the JS
/// error's `code`.
impl AsRef<str> for ErrorCode {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::error::Error for Error {}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::new(ErrorCode::Internal, format!("tensor operation failed: {}", candle_message(&e)))
    }
}

/// A candle error as one line. candle appends a backtrace to its errors when
/// `RUST_BACKTRACE` is set (and puts context on lines of its own); a message is one
/// statement, so those frames are left out.
pub fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string(),
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for returning an error with a code and a formatted message.
#[macro_export]
macro_rules! bail {
    ($code:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::new($crate::error::ErrorCode::$code, format!($($arg)*)))
    };
}
