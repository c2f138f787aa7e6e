//! A TCP fault proxy in front of a store (or a service): passes bytes
//! through, and on command adds latency to every chunk, holds every byte
//! (a blackhole: connections hang, as when packets are dropped, and flow
//! again when it lifts), resets every open connection, or closes them
//! slowly (a slow-close: they hang a while, then end with a clean FIN in
//! the middle of whatever was in flight, as a peer that shuts down does).
//!
//! In front of a Kafka broker it also rewrites the broker's advertised port
//! to its own in every response, as a Kafka proxy must: clients connect to
//! the brokers a Metadata (or FindCoordinator) response names, and would
//! otherwise leave the proxy after their first request.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What the proxy does to the bytes it forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Each chunk held this long, both ways.
    Latency(Duration),
    /// Nothing forwarded until the mode changes.
    Blackhole,
}

/// What ends the open connections: a reset (RST at once) or a slow close
/// (nothing forwarded for the duration, then FIN both ways).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Reset,
    SlowClose(Duration),
}

/// A running proxy on a loopback port; stops when dropped.
pub struct FaultProxy {
    pub name: String,
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    endings: watch::Sender<(u64, Ending)>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(name: &str, upstream: SocketAddr) -> io::Result<Self> {
        Self::start_as(name, upstream, false).await
    }

    /// A proxy in front of a Kafka broker that advertises `upstream`
    /// itself (its host and port).
    pub async fn start_kafka(name: &str, upstream: SocketAddr) -> io::Result<Self> {
        Self::start_as(name, upstream, true).await
    }

    async fn start_as(name: &str, upstream: SocketAddr, kafka: bool) -> io::Result<Self> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let responses = if kafka {
            Responses::KafkaAdvertising {
                host: upstream.ip().to_string(),
                from: upstream.port(),
                to: addr.port(),
            }
        } else {
            Responses::Bytes
        };
        let (mode, _) = watch::channel(Mode::Pass);
        let (endings, _) = watch::channel((0u64, Ending::Reset));
        let (mode_rx, endings_rx) = (mode.subscribe(), endings.subscribe());
        let accept = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((client, _)) = accepted {
                            let (mode, mut endings) = (mode_rx.clone(), endings_rx.clone());
                            endings.mark_unchanged();
                            let responses = responses.clone();
                            connections.spawn(async move {
                                let _ = connection(client, upstream, responses, mode, endings).await;
                            });
                        }
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(Self {
            name: name.to_owned(),
            addr,
            mode,
            endings,
            accept,
        })
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Resets every open connection (RST, not FIN).
    pub fn reset_all(&self) {
        self.endings.send_modify(|(n, e)| {
            *n += 1;
            *e = Ending::Reset;
        });
    }

    /// Closes every open connection slowly: nothing more is forwarded on
    /// it, and after `after` both sides get a FIN.
    pub fn slow_close_all(&self, after: Duration) {
        self.endings.send_modify(|(n, e)| {
            *n += 1;
            *e = Ending::SlowClose(after);
        });
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// How the upstream's bytes are read and passed on.
#[derive(Clone, Debug)]
enum Responses {
    /// As they come.
    Bytes,
    /// Kafka responses (a 4-byte big-endian size, then the response), each
    /// whole, with the broker `host:from` advertised as `host:to`.
    KafkaAdvertising { host: String, from: u16, to: u16 },
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    responses: Responses,
    mode: watch::Receiver<Mode>,
    mut endings: watch::Receiver<(u64, Ending)>,
) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let ending = tokio::select! {
        r = async {
            tokio::try_join!(
                pump(&mut client_read, &mut server_write, &Responses::Bytes, mode.clone()),
                pump(&mut server_read, &mut client_write, &responses, mode),
            )
        } => return r.map(drop),
        _ = endings.changed() => endings.borrow().1,
    };
    match ending {
        Ending::Reset => {
            // Linger 0: closing the socket sends RST.
            for (read, write) in [(client_read, client_write), (server_read, server_write)] {
                read.reunite(write)
                    .map_err(io::Error::other)?
                    .set_zero_linger()?;
            }
        }
        Ending::SlowClose(after) => {
            tokio::time::sleep(after).await;
            let _ = client_write.shutdown().await;
            let _ = server_write.shutdown().await;
            // Let the peers read the FIN before the sockets go.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    reading: &Responses,
    mut mode: watch::Receiver<Mode>,
) -> io::Result<()> {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match reading {
            Responses::Bytes => from.read(&mut buf).await?,
            Responses::KafkaAdvertising {
                host,
                from: old,
                to: new,
            } => match kafka_response(from, &mut buf).await? {
                0 => 0,
                n => {
                    readvertise(&mut buf[4..n], host, *old, *new);
                    n
                }
            },
        };
        if n == 0 {
            return to.shutdown().await;
        }
        loop {
            let now = *mode.borrow_and_update();
            match now {
                Mode::Pass => break,
                Mode::Latency(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Mode::Blackhole => {
                    if mode.changed().await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// Reads one whole Kafka response (its size prefix included) into `buf`,
/// growing it as needed; 0 at the end of the stream.
async fn kafka_response(from: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut size = [0u8; 4];
    match from.read_exact(&mut size).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
        Err(e) => return Err(e),
    }
    let len = usize::try_from(i32::from_be_bytes(size).max(0)).unwrap_or(0) + 4;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    buf[..4].copy_from_slice(&size);
    from.read_exact(&mut buf[4..len]).await?;
    Ok(len)
}

/// Replaces the port of every broker entry `host:from` in a response by
/// `to`. A broker entry is the host as a Kafka string (a 2-byte length, or
/// a varint length + 1 in flexible versions) followed by the port as a
/// 4-byte integer; the port has the same width either way, so the
/// response keeps its size.
fn readvertise(response: &mut [u8], host: &str, from: u16, to: u16) {
    let mut pattern = host.as_bytes().to_vec();
    pattern.extend_from_slice(&i32::from(from).to_be_bytes());
    let mut at = 0;
    while let Some(found) = response[at..]
        .windows(pattern.len())
        .position(|w| w == pattern.as_slice())
    {
        let port_at = at + found + host.len();
        response[port_at..port_at + 4].copy_from_slice(&i32::from(to).to_be_bytes());
        at = port_at + 4;
    }
}

#[cfg(test)]
mod tests {
    use super::readvertise;

    #[test]
    fn the_advertised_port_is_the_proxys() {
        // A Metadata v1 broker entry: node id, host (int16 length), port, rack.
        let mut entry = vec![0, 0, 0, 1, 0, 9];
        entry.extend_from_slice(b"127.0.0.1");
        entry.extend_from_slice(&19092i32.to_be_bytes());
        entry.extend_from_slice(&[0xff, 0xff]);
        let mut response = [entry.clone(), entry].concat();
        readvertise(&mut response, "127.0.0.1", 19092, 40001);
        let port = i32::from_be_bytes(response[15..19].try_into().unwrap());
        let second = i32::from_be_bytes(response[36..40].try_into().unwrap());
        assert_eq!((port, second), (40001, 40001));
        assert_eq!(response.len(), 42);
    }
}
