//! A TCP proxy that holds every chunk of bytes for a fixed time before
//! forwarding it: the latency of a remote endpoint (DynamoDB across a region,
//! 50 ms per request in DESIGN.md §6) on top of a local emulator, without
//! netem (the kernel here has none).
//!
//! Each direction is a delay line, not a queue: a chunk read at `t` is
//! written at `t + delay` while later chunks are already being read, so
//! concurrent or pipelined requests each wait `delay` once (as over a long
//! link) instead of waiting for one another. Order within a connection is
//! kept. A request that arrives in several reads is delayed once overall,
//! since its chunks travel the line together.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Chunks in flight per direction before the proxy stops reading, so a slow
/// reader on the far side still pushes back on the sender.
const LINE_CHUNKS: usize = 256;
const READ_BUF: usize = 64 * 1024;

/// How long each direction holds its bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delays {
    /// Client → upstream.
    pub request: Duration,
    /// Upstream → client.
    pub response: Duration,
}

impl Delays {
    /// `delay` on requests only: one-way latency that a request/response
    /// protocol feels once per round trip.
    pub fn per_request(delay: Duration) -> Self {
        Self {
            request: delay,
            response: Duration::ZERO,
        }
    }
}

/// A running proxy on `127.0.0.1:0`; stops (with all its connections) when
/// dropped.
pub struct DelayProxy {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on an ephemeral loopback port and forwards every connection
    /// to `upstream`.
    ///
    /// # Errors
    /// When the listener cannot be bound.
    pub async fn start(upstream: SocketAddr, delays: Delays) -> io::Result<Self> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let accept = tokio::spawn(async move {
            // Owned here, so aborting the accept task ends every connection.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => {
                            connections.spawn(async move {
                                if let Err(e) = proxy(client, upstream, delays).await {
                                    tracing::debug!(error = %e, "proxied connection ended");
                                }
                            });
                        }
                        Err(e) => tracing::warn!(error = %e, "proxy accept failed"),
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(Self { addr, accept })
    }

    /// Where clients connect instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn proxy(client: TcpStream, upstream: SocketAddr, delays: Delays) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::try_join!(
        delay_line(client_read, server_write, delays.request),
        delay_line(server_read, client_write, delays.response),
    )?;
    Ok(())
}

/// Forwards `from` to `to`, each chunk `delay` after it was read; passes the
/// end of stream on as a write shutdown once everything before it is out.
async fn delay_line(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    delay: Duration,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(LINE_CHUNKS);
    let read = async move {
        let mut buf = vec![0; READ_BUF];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            let due = Instant::now() + delay;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                // The writer stopped on an error it reports itself.
                return Ok(());
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// An upstream that echoes every byte back.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.into_split();
                    tokio::io::copy(&mut r, &mut w).await.ok();
                    w.shutdown().await.ok();
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> Duration {
        let start = Instant::now();
        stream.write_all(msg).await.unwrap();
        let mut back = vec![0; msg.len()];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
        start.elapsed()
    }

    #[tokio::test]
    async fn forwards_every_byte_both_ways_and_the_end_of_stream() {
        let proxy = DelayProxy::start(
            echo_server().await,
            Delays {
                request: Duration::from_millis(5),
                response: Duration::from_millis(5),
            },
        )
        .await
        .unwrap();
        let payload: Vec<u8> = (0..2_000_000_u32).map(|i| (i % 251) as u8).collect();
        let stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        // read_to_end returns only once the proxy passed the echo's EOF on.
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), payload.len());
        assert!(back == payload, "bytes changed on the way");
    }

    #[tokio::test]
    async fn each_request_waits_the_delay() {
        // Long enough that a busy CI machine's scheduling stalls stay well
        // inside the margin of the upper bound.
        let delay = Duration::from_millis(100);
        let proxy = DelayProxy::start(echo_server().await, Delays::per_request(delay))
            .await
            .unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        // Every request on a kept-alive connection pays the delay, not just
        // the first.
        for i in 0..3_u8 {
            let rtt = round_trip(&mut stream, &[i; 100]).await;
            assert!(rtt >= delay, "request {i}: {rtt:?}");
            // Once, not once per direction.
            assert!(rtt < delay * 2, "request {i}: {rtt:?}");
        }
        // Without the proxy the same echo is far faster: the delay is the proxy's.
        let mut direct = TcpStream::connect(echo_server().await).await.unwrap();
        assert!(round_trip(&mut direct, b"ping").await < delay);
    }

    #[tokio::test]
    async fn pipelined_chunks_are_delayed_together_not_one_after_another() {
        let delay = Duration::from_millis(100);
        let proxy = DelayProxy::start(echo_server().await, Delays::per_request(delay))
            .await
            .unwrap();
        let stream = TcpStream::connect(proxy.addr()).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (mut r, mut w) = stream.into_split();
        let start = Instant::now();
        for i in 0..5_u8 {
            w.write_all(&[i; 10]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut back = [0_u8; 50];
        r.read_exact(&mut back).await.unwrap();
        let elapsed = start.elapsed();
        let expected: Vec<u8> = (0..5_u8).flat_map(|i| [i; 10]).collect();
        assert_eq!(back.as_slice(), expected.as_slice(), "order kept");
        // Last chunk written at ~40 ms arrives at ~140 ms; a serial queue
        // would need 5 × 100 ms.
        assert!(elapsed >= Duration::from_millis(140), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(300), "{elapsed:?}");
    }
}
