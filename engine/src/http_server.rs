//! The HTTP front door: an accept loop on hyper's HTTP/1 server instead of `axum::serve`, so
//! that a careless or hostile client cannot hold the engine's sockets.
//!
//! - **Connection cap** (`--max-connections`): a connection beyond it gets a bare 503 and is
//!   closed at once; one warning every [`CAP_LOG_INTERVAL`] says how many were refused.
//! - **Header-read timeout**: a request's head must be complete within `--header-read-timeout`
//!   of its first byte (of the connection's opening, for the first request): slowloris.
//! - **Idle timeout**: a kept-alive connection waiting for its next request is closed after
//!   `--idle-timeout`. Both are one watchdog per connection (`ConnClock`); hyper's own
//!   header timer is off because it also runs while a connection idles, which would tie the
//!   two together.
//! - **Lingering close**: after the last response hyper shuts the socket's write side; the
//!   socket then reads and discards what the client still sends (a refused body) for up to
//!   [`LINGER_TIME`], so that the client can read the 413/401 instead of a reset.
//! - `TCP_NODELAY` on every accepted socket (SSE chunks are small).
//! - **Graceful shutdown**: once `stop` fires the listener is closed (new connections are
//!   refused), idle connections close and running responses finish.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

/// How long a closed connection keeps reading (and discarding) what its client still sends.
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// A lingering connection whose client sent nothing for this long is closed.
const LINGER_QUIET: Duration = Duration::from_millis(500);
/// At most one "connection cap reached" warning per this interval.
pub const CAP_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// What a connection beyond the cap gets before it is closed.
const REFUSED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
retry-after: 1\r\ncontent-length: 0\r\n\r\n";

/// The front door's limits.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time for a request's head, from its first byte.
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
}

/// Descriptors kept spare beyond those open at start: the model file while it loads, the
/// signal pipe, `/proc` reads, a lingering socket or two.
pub const SPARE_DESCRIPTORS: u64 = 16;

/// The process's descriptor limit leaves no room for a single connection.
#[derive(Debug, thiserror::Error)]
#[error(
    "RLIMIT_NOFILE is {limit} and {in_use} descriptors are in use ({SPARE_DESCRIPTORS} more kept \
     spare): no room for connections; raise the limit (LimitNOFILE=, ulimit -n)"
)]
pub struct NoDescriptorsError {
    /// The soft limit.
    pub limit: u64,
    /// Descriptors open at the check.
    pub in_use: u64,
}

/// The connection cap that fits the descriptor limit: each connection holds one descriptor, and
/// a cap above what the limit allows would turn its excess into `EMFILE` on `accept`, where
/// nothing answers (not even `/health`) and the backlog fills. Raises the soft `RLIMIT_NOFILE`
/// toward the hard one as far as `requested` needs; if that is not enough, serves fewer
/// connections and says so.
///
/// # Errors
/// [`NoDescriptorsError`] when not even one connection fits.
pub fn fit_connection_cap(requested: usize) -> Result<usize, NoDescriptorsError> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    // Listing the directory opens one more.
    let in_use =
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1) as u64);
    let needed = (requested as u64)
        .saturating_add(in_use)
        .saturating_add(SPARE_DESCRIPTORS);
    let mut limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft < needed {
        let raised = limit.maximum.map_or(needed, |hard| hard.min(needed));
        if raised > soft {
            limit.current = Some(raised);
            match setrlimit(Resource::Nofile, limit) {
                Ok(()) => tracing::info!(
                    from = soft,
                    to = raised,
                    "raised the soft RLIMIT_NOFILE for --max-connections"
                ),
                Err(error) => tracing::debug!(%error, "cannot raise RLIMIT_NOFILE"),
            }
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let room = soft.saturating_sub(in_use.saturating_add(SPARE_DESCRIPTORS));
    if room == 0 {
        return Err(NoDescriptorsError {
            limit: soft,
            in_use,
        });
    }
    let fitted = usize::try_from(room).map_or(requested, |room| room.min(requested));
    if fitted < requested {
        tracing::warn!(
            max_connections = requested,
            rlimit_nofile = soft,
            descriptors_in_use = in_use,
            serving_at_most = fitted,
            "--max-connections does not fit RLIMIT_NOFILE: lowering the connection cap (raise \
             LimitNOFILE= / ulimit -n to serve more)"
        );
    }
    Ok(fitted)
}

/// Serves `router` on `listener` until `stop` resolves, then drains: the listener is closed
/// and the call returns once every connection has ended. Dropping the future (aborting its
/// task) closes whatever connections are left.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut refused = RefusalLog::default();
    let mut accept_errors = RefusalLog::default();
    let service = TowerToHyperService::new(router);
    tokio::pin!(stop);
    loop {
        let (stream, _peer) = tokio::select! {
            biased;
            () = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // EMFILE and friends: wait a little rather than spin on the error.
                    if let Some(count) = accept_errors.note() {
                        tracing::warn!(%error, errors = count, "cannot accept connections");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            if let Some(count) = refused.note() {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    refused = count,
                    "connection cap reached (--max-connections): refusing new connections"
                );
            }
            // Best effort and never blocking: the socket is closed right after.
            let _ = stream.try_write(REFUSED_RESPONSE);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let clock = Arc::new(ConnClock::new(limits));
        let io = TokioIo::new(ConnIo::new(stream, Arc::clone(&clock)));
        let service = GuardedService {
            inner: service.clone(),
            clock: Arc::clone(&clock),
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        // Our watchdog times heads and idle waits; hyper's timer would merge the two.
        builder.header_read_timeout(None);
        let conn = graceful.watch(builder.serve_connection(io, service));
        let metrics = Arc::clone(&metrics);
        metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        connections.spawn(async move {
            tokio::select! {
                result = conn => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                }
                why = clock.expired() => {
                    tracing::debug!(timeout = why.as_str(), "closing a connection");
                }
            }
            metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    // Refuse new connections from here on.
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        // A connection's task can end without its watched future finishing (the watchdog).
        () = async { while connections.join_next().await.is_some() {} } => {}
    }
    while connections.join_next().await.is_some() {}
}

/// Counts refusals (or errors) and says when one warning is due.
#[derive(Debug, Default)]
struct RefusalLog {
    last: Option<Instant>,
    since_last: u64,
}

impl RefusalLog {
    /// Counts one; returns how many there were since the last warning when one is due.
    fn note(&mut self) -> Option<u64> {
        self.since_last += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < CAP_LOG_INTERVAL)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since_last))
    }
}

/// Which timeout closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    HeaderRead,
    Idle,
}

impl Expired {
    const fn as_str(self) -> &'static str {
        match self {
            Self::HeaderRead => "header_read",
            Self::Idle => "idle",
        }
    }
}

/// One connection's watchdog: no deadline while a request is being served; otherwise the
/// header-read deadline once a head has started, else the idle deadline.
#[derive(Debug)]
struct ConnClock {
    limits: HttpLimits,
    state: Mutex<ClockState>,
    changed: Notify,
}

#[derive(Debug, Clone, Copy)]
struct ClockState {
    /// Requests whose response has not ended.
    busy: usize,
    /// When the connection started waiting for a request.
    waiting_since: Instant,
    /// When the first byte of the awaited request's head arrived.
    head_started: Option<Instant>,
    /// Lingering after the last response: [`ConnIo::poll_shutdown`] bounds it.
    closing: bool,
}

impl ConnClock {
    fn new(limits: HttpLimits) -> Self {
        let now = Instant::now();
        Self {
            limits,
            // A new connection owes its first head: it is timed as one from the start.
            state: Mutex::new(ClockState {
                busy: 0,
                waiting_since: now,
                head_started: Some(now),
                closing: false,
            }),
            changed: Notify::new(),
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut ClockState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn deadline(&self) -> Option<(Instant, Expired)> {
        let s = self.with_state(|s| *s);
        if s.busy > 0 || s.closing {
            return None;
        }
        Some(match s.head_started {
            Some(t) => (t + self.limits.header_read_timeout, Expired::HeaderRead),
            None => (s.waiting_since + self.limits.idle_timeout, Expired::Idle),
        })
    }

    fn bytes_read(&self) {
        let started = self.with_state(|s| {
            let start = s.busy == 0 && s.head_started.is_none();
            if start {
                s.head_started = Some(Instant::now());
            }
            start
        });
        if started {
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        self.with_state(|s| s.busy += 1);
        self.changed.notify_one();
    }

    fn request_ended(&self) {
        self.with_state(|s| {
            s.busy = s.busy.saturating_sub(1);
            if s.busy == 0 {
                s.waiting_since = Instant::now();
                s.head_started = None;
            }
        });
        self.changed.notify_one();
    }

    /// Resolves when the current deadline passes with nothing having moved it.
    async fn expired(&self) -> Expired {
        loop {
            let notified = self.changed.notified();
            match self.deadline() {
                None => notified.await,
                Some((at, why)) => tokio::select! {
                    () = tokio::time::sleep_until(at) => {
                        if self.deadline().is_some_and(|(now_at, _)| now_at <= Instant::now()) {
                            return why;
                        }
                    }
                    () = notified => {}
                },
            }
        }
    }
}

/// The router as a hyper service whose responses tell the connection's clock when they end.
#[derive(Debug, Clone)]
struct GuardedService {
    inner: TowerToHyperService<Router>,
    clock: Arc<ConnClock>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for GuardedService {
    type Response = hyper::Response<GuardedBody>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let guard = BusyGuard::new(Arc::clone(&self.clock));
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|inner| GuardedBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

/// Marks its connection busy from the request's head until the response body is dropped.
#[derive(Debug)]
struct BusyGuard(Arc<ConnClock>);

impl BusyGuard {
    fn new(clock: Arc<ConnClock>) -> Self {
        clock.request_started();
        Self(clock)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body holding its connection's [`BusyGuard`].
#[derive(Debug)]
struct GuardedBody {
    inner: Body,
    _guard: BusyGuard,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The accepted socket: tells the clock when bytes arrive, and lingers on shutdown.
#[derive(Debug)]
struct ConnIo {
    stream: TcpStream,
    clock: Arc<ConnClock>,
    linger: Option<Linger>,
}

#[derive(Debug)]
struct Linger {
    /// The whole linger's end.
    until: Pin<Box<Sleep>>,
    /// Restarted by every read: a quiet client is done.
    quiet: Pin<Box<Sleep>>,
    write_shut: bool,
}

impl ConnIo {
    fn new(stream: TcpStream, clock: Arc<ConnClock>) -> Self {
        Self {
            stream,
            clock,
            linger: None,
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = ready!(Pin::new(&mut self.stream).poll_read(cx, buf));
        if buf.filled().len() > before {
            self.clock.bytes_read();
        }
        Poll::Ready(result)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Sends FIN, then reads and discards until the client closes, goes quiet or the linger
    /// time is up: closing with unread data would send a reset that can destroy the response.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let linger = this.linger.get_or_insert_with(|| Linger {
            until: Box::pin(tokio::time::sleep(LINGER_TIME)),
            quiet: Box::pin(tokio::time::sleep(LINGER_QUIET)),
            write_shut: false,
        });
        if !linger.write_shut {
            this.clock.with_state(|s| s.closing = true);
            ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            linger.write_shut = true;
        }
        let mut scratch = [0u8; 8192];
        loop {
            if linger.until.as_mut().poll(cx).is_ready()
                || linger.quiet.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    linger.quiet.as_mut().reset(Instant::now() + LINGER_QUIET);
                }
                // The peer is gone: nothing left to protect.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HttpLimits {
        HttpLimits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(7),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_is_timed_as_a_head_then_as_idle_between_requests() {
        let clock = ConnClock::new(limits());
        let start = Instant::now();
        assert_eq!(
            clock.deadline(),
            Some((start + Duration::from_secs(2), Expired::HeaderRead))
        );
        clock.request_started();
        assert_eq!(
            clock.deadline(),
            None,
            "no deadline while a request is served"
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        clock.request_ended();
        let ended = Instant::now();
        assert_eq!(
            clock.deadline(),
            Some((ended + Duration::from_secs(7), Expired::Idle))
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        clock.bytes_read();
        assert_eq!(
            clock.deadline(),
            Some((Instant::now() + Duration::from_secs(2), Expired::HeaderRead))
        );
        // Later bytes of the same head do not push the deadline.
        let deadline = clock.deadline();
        tokio::time::advance(Duration::from_secs(1)).await;
        clock.bytes_read();
        assert_eq!(clock.deadline(), deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_waits_for_the_deadline_and_follows_its_moves() {
        let clock = Arc::new(ConnClock::new(limits()));
        clock.request_started();
        clock.request_ended();
        let start = Instant::now();
        let waiter = tokio::spawn({
            let clock = Arc::clone(&clock);
            async move { (clock.expired().await, Instant::now()) }
        });
        tokio::time::advance(Duration::from_secs(1)).await;
        // A head starts: the header deadline (1 s + 2 s) comes before the idle one (7 s).
        clock.bytes_read();
        let (why, at) = waiter.await.unwrap();
        assert_eq!(why, Expired::HeaderRead);
        assert_eq!(at.duration_since(start), Duration::from_secs(3));
    }

    #[test]
    fn the_cap_warning_is_rate_limited_and_counts_what_it_skipped() {
        let mut log = RefusalLog::default();
        assert_eq!(log.note(), Some(1));
        assert_eq!(log.note(), None);
        assert_eq!(log.note(), None);
        log.last = Instant::now().checked_sub(CAP_LOG_INTERVAL);
        assert_eq!(log.note(), Some(3));
    }
}
