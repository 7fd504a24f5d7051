//! A TCP proxy in front of a broker on loopback: forwards each connection, or, while
//! down, refuses new ones and cuts the open ones (a partition as the client sees it).
//! It counts the bytes it carried each way, for "bytes on the wire" figures.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct TcpProxy {
    pub port: u16,
    down: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    /// Bytes from the client to the server, and back.
    pub up_bytes: Arc<AtomicU64>,
    pub down_bytes: Arc<AtomicU64>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    n: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                if to.write_all(&buf[..k]).await.is_err() {
                    break;
                }
                n.fetch_add(k as u64, Ordering::Relaxed);
            }
        }
    }
    let _ = to.shutdown().await;
}

impl TcpProxy {
    /// A proxy on a free loopback port to `127.0.0.1:target`.
    pub async fn start(target: u16) -> TcpProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let up_bytes = Arc::new(AtomicU64::new(0));
        let down_bytes = Arc::new(AtomicU64::new(0));
        let (d, o, ub, db) = (
            down.clone(),
            open.clone(),
            up_bytes.clone(),
            down_bytes.clone(),
        );
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                if d.load(Ordering::SeqCst) {
                    continue;
                }
                let (ub, db) = (ub.clone(), db.clone());
                let task = tokio::spawn(async move {
                    if let Ok(b) = TcpStream::connect(("127.0.0.1", target)).await {
                        let (cr, cw) = c.into_split();
                        let (br, bw) = b.into_split();
                        let up = tokio::spawn(pump(cr, bw, ub));
                        pump(br, cw, db).await;
                        up.abort();
                    }
                });
                o.lock().unwrap().push(task.abort_handle());
            }
        });
        TcpProxy {
            port,
            down,
            open,
            up_bytes,
            down_bytes,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Down: new connections are refused and open ones cut. Up: forwarded again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for t in self.open.lock().unwrap().drain(..) {
                t.abort();
            }
        }
    }

    /// Bytes carried both ways so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.up_bytes.load(Ordering::Relaxed),
            self.down_bytes.load(Ordering::Relaxed),
        )
    }
}
