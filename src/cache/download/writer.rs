//! A download's writes to its spool, on the blocking pool, one in flight
//! while the download task hashes the chunk and receives the next one.
//! Writes land in order: a write starts only once the one before it has
//! landed, so "the spool holds every byte before `landed`" is true the
//! moment `landed` is reported, and a spool never has a hole that a reader
//! could take for zeros.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

/// How a chunk reaches the file: `write_all_at` in service, a slowed or
/// failing one in tests.
pub(super) type WriteFn =
    Arc<dyn Fn(&std::fs::File, &[u8], u64) -> std::io::Result<()> + Send + Sync>;

/// A spool write on the blocking pool, and the offset the spool is complete
/// to once it lands.
type Write = (tokio::task::JoinHandle<std::io::Result<()>>, u64);

/// Writes a download's chunks to its spool on the blocking pool, at most one
/// write in flight.
pub(super) struct SpoolWriter<'a> {
    file: &'a Arc<std::fs::File>,
    write: WriteFn,
    in_flight: Option<Write>,
}

/// The write of a running mirror.
pub(super) fn write_all_at() -> WriteFn {
    Arc::new(|f, data, offset| f.write_all_at(data, offset))
}

impl<'a> SpoolWriter<'a> {
    pub(super) fn with(file: &'a Arc<std::fs::File>, write: WriteFn) -> Self {
        Self {
            file,
            write,
            in_flight: None,
        }
    }

    /// Waits for the write in flight, then starts writing `data` at
    /// `offset`: the offset the spool is complete to once the previous
    /// write landed (`None` when there was none).
    pub(super) async fn write(&mut self, data: Bytes, offset: u64) -> std::io::Result<Option<u64>> {
        let landed = self.finish().await?;
        let (file, write) = (self.file.clone(), self.write.clone());
        let end = offset + data.len() as u64;
        let handle = tokio::task::spawn_blocking(move || write(&file, &data, offset));
        self.in_flight = Some((handle, end));
        Ok(landed)
    }

    /// Waits for the last write: the offset the spool is complete to.
    pub(super) async fn finish(&mut self) -> std::io::Result<Option<u64>> {
        let Some((handle, end)) = self.in_flight.take() else {
            return Ok(None);
        };
        handle.await.map_err(std::io::Error::other)??;
        Ok(Some(end))
    }

    /// Waits for the write in flight, whatever its result.
    pub(super) async fn abandon(&mut self) {
        let _ = self.finish().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// The first write is slow; had a second one started before it landed,
    /// the second would land first (and a reader would find a hole).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_land_in_order_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.path().join("spool"))
                .unwrap(),
        );
        let landed_order = Arc::new(Mutex::new(Vec::new()));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let write: WriteFn = {
            let (order, running, most) = (landed_order.clone(), running.clone(), most.clone());
            Arc::new(move |f, data, offset| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                if offset == 0 {
                    std::thread::sleep(Duration::from_millis(100));
                }
                f.write_all_at(data, offset)?;
                order.lock().unwrap().push(offset);
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
        };
        let mut writer = SpoolWriter::with(&file, write);
        let mut reported = Vec::new();
        for i in 0..4u64 {
            let landed = writer
                .write(Bytes::from(vec![i as u8 + 1; 10]), i * 10)
                .await;
            reported.push(landed.unwrap());
            // What `landed` claims is in the file, with no hole before it.
            if let Some(end) = reported.last().copied().flatten() {
                let mut buf = vec![0u8; end as usize];
                file.read_exact_at(&mut buf, 0).unwrap();
                assert!(buf.iter().all(|&b| b != 0), "a hole before {end}");
            }
        }
        assert_eq!(writer.finish().await.unwrap(), Some(40));
        assert_eq!(reported, vec![None, Some(10), Some(20), Some(30)]);
        assert_eq!(*landed_order.lock().unwrap(), vec![0, 10, 20, 30]);
        assert_eq!(most.load(Ordering::SeqCst), 1, "two writes in flight");
    }
}
