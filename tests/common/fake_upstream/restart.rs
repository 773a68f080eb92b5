//! Serving again after [`FakeUpstream::stop`], on the same port: an upstream that was down
//! and is back, for the tests of what the mirror reports while it is gone.

use tokio::net::TcpListener;

use super::{accept_loop, FakeUpstream};

impl FakeUpstream {
    /// Accepts connections on its address again (content, faults and logs kept).
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind fake");
        let task = tokio::spawn(accept_loop(listener, self.shared.clone()));
        *self.accept.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }
}
