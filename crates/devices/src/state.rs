//! Device state for snapshots: each device saves a plain, versioned serde struct
//! ([`vmcraft_snapshot::Versioned`]) and restores from one, checking every field it
//! is given (a snapshot file is input like any other: truncated, corrupted or
//! hand-made ones must give an error, never a device in an impossible state).

use thiserror::Error;

/// A device state that cannot be restored.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("cannot restore the {device}: {reason}")]
pub struct StateError {
    /// The device.
    pub device: &'static str,
    /// What is wrong with the state it was given.
    pub reason: String,
}

impl StateError {
    /// A state for `device` that is wrong because of `reason`.
    pub fn new(device: &'static str, reason: impl Into<String>) -> Self {
        StateError {
            device,
            reason: reason.into(),
        }
    }
}
