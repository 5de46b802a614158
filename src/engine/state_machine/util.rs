//! Errors and small helpers.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use d_engine_core::{Error, StorageError};

pub(super) fn sm_err(message: String) -> Error {
    Error::from(StorageError::StateMachineError(message))
}

pub(super) fn path_err(path: &Path, e: io::Error) -> Error {
    sm_err(format!("{path:?}: {e}"))
}

pub(super) trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, Error>;
}

impl<T, E: fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, Error> {
        self.map_err(|e| sm_err(format!("{what}: {e}")))
    }
}

pub(super) fn remove_if_exists(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(path_err(path, e)),
        _ => Ok(()),
    }
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| path_err(dir, e))
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
