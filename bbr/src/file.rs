//! File mode: the mapping from a YAML or JSON file ([`crate::mapping::MappingFile`]), read at
//! start-up and again whenever its bytes change.
//!
//! The file is polled (a ConfigMap mounted as a volume changes by a symlink swap, which
//! inotify-style watches miss). A read that fails or does not parse keeps the mapping as it was
//! (logged and counted), so a half-written file never drops models from routing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::mapping::{self, Mapping, MappingError};
use crate::metrics::Metrics;

/// Why the mapping file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a valid mapping.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        source: MappingError,
    },
}

/// The file and the bytes last applied.
#[derive(Debug)]
pub struct MappingFileSource {
    path: PathBuf,
    last: Option<Vec<u8>>,
}

impl MappingFileSource {
    /// A source that has read nothing yet.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            last: None,
        }
    }

    /// Reads the file and applies it when its bytes changed. `Ok(true)` when the mapping was
    /// replaced.
    pub async fn poll(&mut self, mapping: &Mapping) -> Result<bool, FileError> {
        // Capped as the parser caps it, before it is read: not a /dev/zero read into memory.
        let bytes = endpoint_picker::files::read_at_most(&self.path, mapping::MAX_FILE_BYTES)
            .await
            .map_err(|source| FileError::Read {
                path: self.path.clone(),
                source,
            })?;
        if self.last.as_deref() == Some(bytes.as_slice()) {
            return Ok(false);
        }
        let invalid = |source| FileError::Invalid {
            path: self.path.clone(),
            source,
        };
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| invalid(MappingError::Adapters("not UTF-8".into())))?;
        let entries = mapping::parse_file(text).map_err(invalid)?;
        mapping.reset(entries);
        self.last = Some(bytes);
        Ok(true)
    }

    /// Polls every `interval` until `shutdown`.
    pub async fn run(
        mut self,
        interval: Duration,
        mapping: Arc<Mapping>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.poll(&mapping).await {
                Ok(true) => {
                    failing = false;
                    tracing::info!(path = %self.path.display(), "mapping file reloaded");
                }
                Ok(false) => failing = false,
                Err(error) => {
                    if !failing {
                        metrics.sources_rejected.inc();
                        tracing::warn!(%error, "mapping file not reloaded; keeping the last good one");
                    }
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn reloads_on_change_and_keeps_the_last_good_mapping() {
        let dir = std::env::temp_dir().join(format!("bbr-file-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mapping.yaml");
        std::fs::write(&path, "mappings:\n- baseModel: llama\n  adapters: [food]\n").unwrap();
        let mapping = Mapping::new();
        let mut source = MappingFileSource::new(&path);
        assert!(source.poll(&mapping).await.unwrap());
        assert!(*mapping.synced().borrow());
        assert_eq!(mapping.lookup().base_model("food"), Some("llama"));
        assert!(!source.poll(&mapping).await.unwrap(), "unchanged bytes");

        std::fs::write(&path, "mappings:\n- baseModel: llama\n  adapters: [sql]\n").unwrap();
        assert!(source.poll(&mapping).await.unwrap());
        assert_eq!(mapping.lookup().base_model("food"), None);
        assert_eq!(mapping.lookup().base_model("sql"), Some("llama"));

        std::fs::write(&path, "mappings:\n- adapters: [oops]\n").unwrap();
        assert!(matches!(
            source.poll(&mapping).await,
            Err(FileError::Invalid { .. })
        ));
        assert_eq!(mapping.lookup().base_model("sql"), Some("llama"));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            source.poll(&mapping).await,
            Err(FileError::Read { .. })
        ));
        assert_eq!(mapping.lookup().base_model("sql"), Some("llama"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
