//! A TCP fault proxy in front of a store (or a service): passes bytes
//! through, and on command adds latency to every chunk, holds every byte
//! (a blackhole: connections hang, as when packets are dropped, and flow
//! again when it lifts), resets every open connection, or closes them
//! slowly (a slow-close: they hang a while, then end with a clean FIN in
//! the middle of whatever was in flight, as a peer that shuts down does).

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
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
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
                            connections.spawn(async move {
                                let _ = connection(client, upstream, mode, endings).await;
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

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
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
                pump(&mut client_read, &mut server_write, mode.clone()),
                pump(&mut server_read, &mut client_write, mode),
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
    mut mode: watch::Receiver<Mode>,
) -> io::Result<()> {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
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
