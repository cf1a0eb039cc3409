//! What every accept loop does when `accept()` fails.
//!
//! A failed accept leaves the pending connection in the backlog: when the cause is the
//! process's or the system's fd table being full (EMFILE, ENFILE) or memory (ENOBUFS,
//! ENOMEM), the very next accept fails the same way, and a loop that retries at once spins a
//! core until something closes. Those errors pause the loop briefly; errors about one
//! connection (ECONNABORTED: the client gave up while queued) do not.
use std::{io, time::Duration};

/// How long an HTTP/1.1 client may take to send a request's headers, counted from when
/// the connection starts waiting for it (so also how long a keep-alive connection idles).
/// Every HTTP server of the agent (the proxy's and its own endpoints) lets go of a client that
/// takes longer.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an accept loop waits after running out of fds or memory.
pub const RESOURCE_BACK_OFF: Duration = Duration::from_millis(100);

/// Whether `error` means the process or the system ran out of something, so accepting again
/// right away would fail again.
pub fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Call after a failed accept: sleeps [`RESOURCE_BACK_OFF`] when the error is resource
/// exhaustion, returns at once otherwise.
pub async fn back_off(error: &io::Error) {
    if is_resource_exhaustion(error) {
        tokio::time::sleep(RESOURCE_BACK_OFF).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fd_exhaustion_pauses_the_loop_and_a_lost_client_does_not() {
        // Real exhaustion cannot be staged here: the fd table is shared with every test
        // thread of this process. The errors are what accept(2) returns.
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let started = tokio::time::Instant::now();
            back_off(&io::Error::from_raw_os_error(errno)).await;
            assert_eq!(started.elapsed(), RESOURCE_BACK_OFF, "errno {errno}");
        }
        let started = tokio::time::Instant::now();
        back_off(&io::Error::from_raw_os_error(libc::ECONNABORTED)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
