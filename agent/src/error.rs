//! The agent's one error type: everything that can stop the agent or a
//! session start, and the exit status each one means.

use std::path::Path;

use crate::client::ClientError;
use crate::config::ConfigError;

/// Everything that can stop the agent or a session start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("user {user}: {message}")]
    User { user: String, message: String },
    #[error("{0}")]
    Setup(String),
    /// Control does not accept this host's key (wrong or revoked).
    #[error("control refused this host's key ({code}): {message}. Check host_key in the config; a revoked host needs a new key from My hosts")]
    KeyRejected { code: String, message: String },
    #[error(transparent)]
    Control(ClientError),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// The process exit status for this error: 2 for what the owner must
    /// fix in the config (bad file, refused key), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::KeyRejected { .. } => 2,
            _ => 1,
        }
    }
}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::KeyRejected { code, message } => Error::KeyRejected { code, message },
            other => Error::Control(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_keys_exit_with_status_2() {
        let e: Error = ClientError::KeyRejected {
            code: "host_key_invalid".into(),
            message: "unknown key".into(),
        }
        .into();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("host_key_invalid"), "{e}");
        let e: Error = ClientError::Unavailable("down".into()).into();
        assert_eq!(e.exit_code(), 1);
    }
}
