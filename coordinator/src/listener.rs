//! The coordinator's TCP listener, with limits a stranger cannot hold open:
//! at most `max_connections` connections, at most `max_per_ip` from one
//! address, and a connection that sends or takes nothing for `idle` (while
//! its headers are read, or between keep-alive requests) is closed.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use troop_protocol::sync::MutexExt as _;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutStream;

/// Limits for [`Guarded`].
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub max_per_ip: u32,
    pub idle: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 8192,
            max_per_ip: 256,
            // Above the 30 s request timeout, so a slow handler's connection
            // is never cut while it works.
            idle: Duration::from_secs(60),
        }
    }
}

pub struct Guarded {
    inner: TcpListener,
    limits: ConnLimits,
    slots: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Guarded {
    pub fn new(inner: TcpListener, limits: ConnLimits) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            limits,
        }
    }

    fn admit(&self, ip: IpAddr) -> Option<Slot> {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            metrics::counter!("troop_limit_hits_total", "limit" => "connections").increment(1);
            return None;
        };
        let mut map = self.per_ip.locked()?;
        let n = map.entry(ip).or_insert(0);
        if *n >= self.limits.max_per_ip {
            metrics::counter!("troop_limit_hits_total", "limit" => "connections_per_ip")
                .increment(1);
            return None;
        }
        *n += 1;
        Some(Slot {
            _permit: permit,
            ip,
            per_ip: self.per_ip.clone(),
        })
    }
}

/// A connection's place; given back when the connection is dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(mut map) = self.per_ip.locked()
            && let Some(n) = map.get_mut(&self.ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// An accepted connection with its idle timeouts and its place.
pub struct GuardedIo {
    io: Pin<Box<TimeoutStream<TcpStream>>>,
    _slot: Slot,
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl axum::serve::Listener for Guarded {
    type Io = GuardedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = match self.inner.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // An IPv6 client counts by its /64, as the rate limits do.
            let Some(slot) = self.admit(crate::client_addr::limit_key(addr.ip())) else {
                tracing::debug!(%addr, "connection refused: over the connection limits");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let mut io = TimeoutStream::new(tcp);
            io.set_read_timeout(Some(self.limits.idle));
            io.set_write_timeout(Some(self.limits.idle));
            return (
                GuardedIo {
                    io: Box::pin(io),
                    _slot: slot,
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The client's address, as `ConnectInfo<ClientAddr>` in a request's
/// extensions (what `ConnectInfo<SocketAddr>` is for a plain listener).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Guarded>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Guarded>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}
