//! Connections: the accept loop in front of the router, and what a connection may hold.
//!
//! Every connection is HTTP/1.1 (hyper's `http1` builder: an h2c preface is just a bad request),
//! and each is bounded in time and number, so that a client without a key cannot hold resources:
//!
//! - at most `max_connections` are open at once (512 by default: under the usual 1,024
//!   descriptors, and at the 1 MiB body limit at most 512 MiB of bodies in flight). A connection
//!   over the cap gets a fixed 503/50004 envelope with `Retry-After: 1` and is closed; when even
//!   those answers pile up (more than [`MAX_REFUSALS`] at once) it is closed without one;
//! - an idle keep-alive connection is closed after `idle_timeout` (75 s: longer than the 60 s
//!   idle timeout of common load balancers, so they close first and never send on a connection
//!   we are closing);
//! - a request head must be complete within `header_read_timeout` (10 s) of its first byte;
//! - the body is read by the handler that needs it, within the body-read timeout
//!   (`api::HttpConfig`), after the key has been checked from the head alone.
//!
//! Each connection runs a small watchdog beside hyper: the socket wrapper notes when a new head
//! starts, the service notes when a request is in flight, and the watchdog closes the connection
//! at the deadline of its current phase. While a request is in flight it also checks every
//! [`HANGUP_CHECK`] whether the client has closed its side: hyper notices that by itself only
//! when it has nothing buffered, so a client that pipelined a second request and then went away
//! would otherwise keep its generation running. A half-close (FIN after the request) looks the
//! same as a close until a response is written, so memex treats it as the client going away: its
//! request is cancelled and it gets no answer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::telemetry::{Metrics, Rejection};

/// Over-cap connections answered at once; beyond this they are closed without an answer, so
/// that refusing is bounded too.
const MAX_REFUSALS: usize = 64;
/// How long an over-cap answer may take, reading what the client sent included.
const REFUSAL_TIME: Duration = Duration::from_secs(1);
/// How often a connection with a request in flight checks whether its client hung up.
const HANGUP_CHECK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 512,
        }
    }
}

/// Accept and serve connections until `stop` resolves; then stop accepting, ask every open
/// connection to finish its current request and close, and return once all have closed (the
/// caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: ConnectionConfig,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
) {
    let max = config.max_connections.max(1);
    let open = Arc::new(Semaphore::new(max));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let config = Arc::new(config);
    let (closing_tx, closing_rx) = watch::channel(false);
    tokio::pin!(stop);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match open.clone().try_acquire_owned() {
            Ok(permit) => {
                let conn = Connection {
                    router: router.clone(),
                    config: config.clone(),
                    closing: closing_rx.clone(),
                    _permit: permit,
                };
                tokio::spawn(conn.run(stream));
            }
            Err(_) => {
                metrics.reject(Rejection::Connections);
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(refuse(stream, max, permit));
                }
            }
        }
    }
    drop(listener);
    closing_tx.send_replace(true);
    // Every open connection holds a permit: all of them back means all closed.
    let _ = open.acquire_many(max as u32).await;
}

/// The answer of a connection over the cap: a fixed 503 envelope, written without parsing the
/// request. What the client already sent is read and dropped (up to 64 KiB, within
/// [`REFUSAL_TIME`]) before closing, so that the close does not reset the connection and
/// destroy the answer before the client has read it.
async fn refuse(mut stream: TcpStream, max: usize, _permit: OwnedSemaphorePermit) {
    let body = format!(
        r#"{{"code":50004,"message":"server is at its limit of {max} open connections; retry later","data":null}}"#
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         x-request-id: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        uuid::Uuid::new_v4(),
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 4096];
        let mut read = 0;
        while read < 64 << 10 {
            match stream.read(&mut buf).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<_, io::Error>(())
    })
    .await;
}

struct Connection {
    router: Router,
    config: Arc<ConnectionConfig>,
    closing: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn run(mut self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let hangup = Hangup::of(&stream);
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: activity.clone(),
        });
        let service = Tracked {
            inner: TowerToHyperService::new(self.router.clone()),
            activity: activity.clone(),
        };
        let mut builder = http1::Builder::new();
        // hyper's own head timer runs from the moment a connection waits for a head, idle time
        // included; ours (below) tells the two apart. Theirs stays as a backstop.
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.idle_timeout + self.config.header_read_timeout)
            .half_close(false)
            .keep_alive(true);
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        let mut closing = false;
        loop {
            let (deadline, phase) = activity.deadline(&self.config);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = tokio::time::sleep_until(deadline) => {
                    let expired = match phase {
                        Phase::Busy => hangup.happened(),
                        Phase::Idle | Phase::Head => activity.deadline(&self.config).0 <= Instant::now(),
                    };
                    if expired {
                        tracing::debug!(phase = phase.name(), "closing connection");
                        // Dropping the connection closes the socket and drops any request in
                        // flight (which cancels its generation).
                        return;
                    }
                }
                () = activity.changed.notified() => {}
                _ = self.closing.changed(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of the next request head.
    Idle,
    /// A head has started arriving and is not complete.
    Head,
    /// A request is being answered (its body read by the handler, within its own timeout).
    Busy,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle timeout",
            Self::Head => "request head not complete within the header-read timeout",
            Self::Busy => "client hung up with a request in flight",
        }
    }
}

struct PhaseState {
    phase: Phase,
    since: Instant,
    in_flight: usize,
}

/// Where a connection is, shared by the socket wrapper, the service and the watchdog.
struct Activity {
    state: Mutex<PhaseState>,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(PhaseState {
                phase: Phase::Idle,
                since: Instant::now(),
                in_flight: 0,
            }),
            changed: Notify::new(),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut PhaseState) -> R) -> R {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }

    fn deadline(&self, config: &ConnectionConfig) -> (Instant, Phase) {
        self.with(|s| {
            let at = match s.phase {
                Phase::Idle => s.since + config.idle_timeout,
                Phase::Head => s.since + config.header_read_timeout,
                Phase::Busy => Instant::now() + HANGUP_CHECK,
            };
            (at, s.phase)
        })
    }

    /// Bytes arrived: if the connection was idle, a head has started.
    fn bytes_read(&self) {
        let started = self.with(|s| {
            let idle = s.phase == Phase::Idle;
            if idle {
                s.phase = Phase::Head;
                s.since = Instant::now();
            }
            idle
        });
        if started {
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        self.with(|s| {
            s.in_flight += 1;
            s.phase = Phase::Busy;
        });
        self.changed.notify_one();
    }

    fn request_answered(&self) {
        self.with(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.phase = Phase::Idle;
                s.since = Instant::now();
            }
        });
        self.changed.notify_one();
    }
}

/// The socket, noting in [`Activity`] when bytes arrive.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The router, noting in [`Activity`] when a request is in flight.
struct Tracked {
    inner: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

/// Marks the request answered when its future ends or is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_answered();
    }
}

impl Service<Request<Incoming>> for Tracked {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.activity.request_started();
        let guard = InFlight(self.activity.clone());
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await;
            drop(guard);
            response
        })
    }
}

/// Whether the client has closed its side of the connection, asked of the kernel without
/// reading (`POLLRDHUP`), so that bytes it pipelined before closing do not hide the close.
struct Hangup {
    #[cfg(target_os = "linux")]
    fd: std::os::fd::RawFd,
}

impl Hangup {
    fn of(stream: &TcpStream) -> Self {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            Self {
                fd: stream.as_raw_fd(),
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = stream;
            Self {}
        }
    }

    /// Only called while the connection (and so the descriptor) is open.
    fn happened(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            let mut p = libc::pollfd {
                fd: self.fd,
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: one valid pollfd, a zero timeout; the descriptor is owned by the
            // connection this is called beside, which is still open.
            let n = unsafe { libc::poll(&mut p, 1, 0) };
            n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }
}
