//! A download's writes to its spool, on the blocking pool, one in flight
//! while the download task receives and hashes the next chunk.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

/// A spool write on the blocking pool, and the offset the spool is complete
/// to once it lands.
pub(super) type Write = (tokio::task::JoinHandle<std::io::Result<()>>, u64);

/// Writes a download's chunks to its spool on the blocking pool, keeping one
/// write in flight so receiving and hashing the next chunk overlap it.
pub(super) struct SpoolWriter<'a> {
    file: &'a Arc<std::fs::File>,
    in_flight: Option<Write>,
}

impl<'a> SpoolWriter<'a> {
    pub(super) fn new(file: &'a Arc<std::fs::File>) -> Self {
        Self {
            file,
            in_flight: None,
        }
    }

    /// Starts writing `data` at `offset`; hands back the write before it,
    /// to be [`land`](Self::land)ed.
    pub(super) fn start(&mut self, data: Bytes, offset: u64) -> Option<Write> {
        let file = self.file.clone();
        let end = offset + data.len() as u64;
        let handle = tokio::task::spawn_blocking(move || file.write_all_at(&data, offset));
        self.in_flight.replace((handle, end))
    }

    /// Waits for a write: the offset the spool is complete to after it.
    pub(super) async fn land(write: Option<Write>) -> std::io::Result<Option<u64>> {
        let Some((handle, end)) = write else {
            return Ok(None);
        };
        handle.await.map_err(std::io::Error::other)??;
        Ok(Some(end))
    }

    /// Waits for the last write.
    pub(super) async fn finish(&mut self) -> std::io::Result<Option<u64>> {
        Self::land(self.in_flight.take()).await
    }

    /// Waits for the write in flight, whatever its result.
    pub(super) async fn abandon(&mut self) {
        let _ = self.finish().await;
    }
}
