//! The `--local-recipients` file: read at start (a file that does not load
//! stops the start) and on SIGHUP (a file that does not load is logged and
//! the table in force stays). What the table means, and the check itself,
//! are [`crate::policy::recipient`]'s; this module only reads the file.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::policy::recipient::{RecipientTable, Recipients, TableError};

#[derive(Debug, Error)]
pub enum RecipientsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Syntax { path: PathBuf, source: TableError },
}

/// The file, and the table every session config shares.
#[derive(Debug)]
pub struct RecipientsStore {
    path: Option<PathBuf>,
    recipients: Recipients,
}

impl RecipientsStore {
    /// Reads `path` into `recipients` (the handle the session configs
    /// hold). Without a path there is nothing to read or reload.
    pub fn load(
        path: Option<PathBuf>,
        recipients: Recipients,
    ) -> Result<RecipientsStore, RecipientsError> {
        let store = RecipientsStore { path, recipients };
        if let Some(n) = store.reload().transpose()? {
            tracing::info!(entries = n, "local recipients loaded");
        }
        Ok(store)
    }

    /// The table every session config shares (disabled without a file).
    pub fn handle(&self) -> &Recipients {
        &self.recipients
    }

    /// Re-reads the file; `None` when none is configured, else the number
    /// of entries now in force or why the old ones stay.
    pub fn reload(&self) -> Option<Result<usize, RecipientsError>> {
        let path = self.path.as_ref()?;
        let table = std::fs::read_to_string(path)
            .map_err(|source| RecipientsError::Read {
                path: path.clone(),
                source,
            })
            .and_then(|text| {
                RecipientTable::parse(&text).map_err(|source| RecipientsError::Syntax {
                    path: path.clone(),
                    source,
                })
            });
        Some(table.map(|t| {
            let n = t.len();
            self.recipients.replace(t);
            n
        }))
    }
}
