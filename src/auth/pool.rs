//! Where bcrypt runs: at most `threads` checks at once, each on a thread of
//! its own. Not tokio's blocking pool, which reads the disk, writes spools
//! and hashes blobs for every pull: a flood of wrong passwords there would
//! stall them all (and it grows to hundreds of threads, so it would also
//! take every core). Knows nothing of users or passwords.

use std::sync::Arc;

use tokio::sync::{oneshot, Semaphore};

use crate::error::Error;

/// The name of the threads, as `top -H` shows them.
const THREAD_NAME: &str = "regmirror-bcrypt";
/// The threads' nice value: when the cores are busy, serving pulls comes
/// before checking passwords (a check waits; a pull of cached layers does not).
const NICE: i32 = 10;

/// A bound on concurrent bcrypt work.
pub struct BcryptPool {
    permits: Arc<Semaphore>,
}

impl BcryptPool {
    pub fn new(threads: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(threads.max(1))),
        }
    }

    /// Runs `work` once a permit is free, on a new thread. The thread keeps
    /// the permit until `work` returns, even when the caller has gone, so
    /// the bound holds for abandoned checks too. A thread per check costs
    /// microseconds beside a bcrypt's milliseconds, and leaves nothing
    /// running when the mirror stops.
    pub async fn run<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| Error::internal("bcrypt permits", e))?;
        let (tx, rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || {
                let _permit = permit;
                lower_priority();
                let _ = tx.send(work());
            })
            .map_err(|e| Error::internal("cannot start a bcrypt thread", e))?;
        rx.await
            .map_err(|_| Error::Internal("a bcrypt thread panicked".into()))
    }
}

/// Lowers the calling thread's priority (on Linux a thread is its own
/// scheduling entity; elsewhere this would renice the process, so it is not
/// done). A failure only costs the preference.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(None, NICE) {
        tracing::debug!(error = %e, "cannot lower the bcrypt thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn at_most_the_permitted_checks_run_at_once_on_threads_of_their_own() {
        let pool = Arc::new(BcryptPool::new(2));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let jobs = (0..12).map(|_| {
            let (pool, running, most) = (pool.clone(), running.clone(), most.clone());
            async move {
                pool.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                    let nice = rustix::process::getpriority_process(None).unwrap();
                    (std::thread::current().name().map(str::to_owned), nice)
                })
                .await
                .unwrap()
            }
        });
        let names = futures_util::future::join_all(jobs).await;
        for (name, nice) in names {
            assert_eq!(name.as_deref(), Some(THREAD_NAME));
            assert!(nice >= NICE, "nice {nice}");
        }
        assert_eq!(most.load(Ordering::SeqCst), 2, "two permits, twelve jobs");
    }

    #[tokio::test]
    async fn a_panicking_check_is_an_error_and_frees_its_permit() {
        let pool = BcryptPool::new(1);
        let e = pool.run(|| -> bool { panic!("boom") }).await.unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e}");
        assert!(pool.run(|| true).await.unwrap());
    }
}
