//! Blob bodies of the fake registry, sent chunk by chunk with the body faults applied
//! (delay, pause at the gate, cut, stall) and reported in the shared [`Progress`].

use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::watch;

use super::{Progress, Shared};

pub(crate) type Body = BoxBody<Bytes, std::io::Error>;

/// How one body is sent.
pub(crate) struct BodyPlan {
    pub chunk: usize,
    pub delay: Option<Duration>,
    pub cut_after: Option<u64>,
    pub stall_after: Option<u64>,
    pub pause_at: Option<u64>,
}

struct Sending {
    progress: watch::Sender<Progress>,
    gate: Option<watch::Receiver<bool>>,
    data: Bytes,
    pos: usize,
    plan: BodyPlan,
    paused: bool,
    finished: bool,
}

impl Drop for Sending {
    fn drop(&mut self) {
        if !self.finished {
            self.progress.send_modify(|p| p.bodies_dropped += 1);
        }
    }
}

impl Sending {
    /// The next frame, or `None` at the end. Faults act at chunk boundaries.
    async fn next(&mut self) -> Option<Result<Frame<Bytes>, std::io::Error>> {
        if self.finished {
            return None;
        }
        let pos = self.pos as u64;
        if let Some(gate) = self.gate.as_mut() {
            if !self.paused && self.plan.pause_at.is_some_and(|at| pos >= at) {
                self.paused = true;
                self.progress.send_modify(|p| p.paused += 1);
                // Sender gone means the fake stopped: go on (the connection is dying anyway).
                let _ = gate.wait_for(|open| *open).await;
            }
        }
        if self.plan.cut_after.is_some_and(|at| pos >= at) {
            // Let hyper flush what was sent before the cut (it drops unflushed bytes on error).
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.finished = true;
            self.progress.send_modify(|p| p.bodies_cut += 1);
            return Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "fault: connection cut",
            )));
        }
        if self.plan.stall_after.is_some_and(|at| pos >= at) {
            // Until the client gives up and the body is dropped.
            std::future::pending::<()>().await;
        }
        if self.pos >= self.data.len() {
            self.finished = true;
            self.progress.send_modify(|p| p.bodies_completed += 1);
            return None;
        }
        if self.pos > 0 {
            if let Some(d) = self.plan.delay {
                tokio::time::sleep(d).await;
            }
        }
        let mut end = (self.pos + self.plan.chunk).min(self.data.len());
        // Stop exactly at the offsets where a fault acts.
        for at in [
            self.plan.cut_after,
            self.plan.stall_after,
            self.plan.pause_at,
        ]
        .into_iter()
        .flatten()
        {
            let at = at as usize;
            if at > self.pos && at < end {
                end = at;
            }
        }
        let chunk = self.data.slice(self.pos..end);
        self.pos = end;
        if end == self.data.len() && self.plan.cut_after.is_none_or(|at| at as usize > end) {
            // hyper stops polling once Content-Length bytes went out: this is the end.
            self.finished = true;
            self.progress.send_modify(|p| p.bodies_completed += 1);
        }
        self.progress
            .send_modify(|p| p.bytes_sent += chunk.len() as u64);
        Some(Ok(Frame::data(chunk)))
    }
}

/// A streamed body of `data` following `plan`.
pub(crate) fn blob_body(shared: &Shared, data: Bytes, plan: BodyPlan) -> Body {
    shared.progress.send_modify(|p| p.bodies_started += 1);
    let gate = plan.pause_at.map(|_| shared.gate.subscribe());
    let state = Sending {
        progress: shared.progress.clone(),
        gate,
        data,
        pos: 0,
        plan,
        paused: false,
        finished: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        let frame = s.next().await?;
        Some((frame, s))
    });
    StreamBody::new(stream).boxed()
}
