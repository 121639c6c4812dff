//! Lingering close, as nginx does it. When keel answers a request whose
//! body it did not read (413, 400, 431, 408) and closes, the client may
//! still be sending that body. Closing a socket with unread bytes in its
//! receive buffer sends a reset, and a reset makes the client's kernel
//! throw away the response it had not read yet: the client sees "connection
//! reset" instead of the 413. So a client connection keel closes first is
//! not closed at once: its write side is shut (the client reads the
//! response, then end of stream), and whatever the client still sends is
//! read and thrown away until it closes its side, for at most
//! [`LINGER_TIME`] and [`LINGER_BYTES`], then the socket is closed.
//!
//! A connection the client closed first (keel read its end of stream) has
//! nothing left to drain and closes at once, which is every keep-alive
//! connection's ordinary end. At most [`MAX_LINGERING`] connections linger
//! at once; beyond that one closes at once, as before.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The longest a closed connection drains what its client still sends
/// (nginx: `lingering_time` 30 s; keel's bodies are smaller).
const LINGER_TIME: Duration = Duration::from_secs(10);
/// The longest a draining connection waits for the client's next bytes
/// (nginx: `lingering_timeout` 5 s).
const LINGER_IDLE: Duration = Duration::from_secs(2);
/// The most a closed connection reads and throws away.
const LINGER_BYTES: u64 = 64 << 20;
/// Connections lingering at once at most; beyond, one closes at once.
const MAX_LINGERING: usize = 4096;

static LINGERING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A client connection that lingers when keel closes it first.
#[derive(Debug)]
pub(crate) struct Lingering {
    stream: Option<TcpStream>,
    /// The client closed its side: nothing to drain.
    read_closed: bool,
}

impl Lingering {
    pub(crate) fn new(stream: TcpStream) -> Lingering {
        Lingering {
            stream: Some(stream),
            read_closed: false,
        }
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("taken only on drop"))
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.stream().poll_read(cx, buf);
        if let Poll::Ready(result) = &polled {
            // Zero bytes into a buffer with room: the client's end.
            if result.is_err() || (buf.filled().len() == before && buf.remaining() > 0) {
                self.read_closed = true;
            }
        }
        polled
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if self.read_closed {
            return;
        }
        use std::sync::atomic::Ordering;
        if LINGERING.fetch_add(1, Ordering::AcqRel) >= MAX_LINGERING {
            LINGERING.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move {
                drain(stream).await;
                LINGERING.fetch_sub(1, Ordering::AcqRel);
            })),
            Err(_) => drop(LINGERING.fetch_sub(1, Ordering::AcqRel)),
        }
    }
}

/// Shuts the write side, then reads and discards until the client closes,
/// goes quiet, or the time or byte bound is reached; the socket closes when
/// this returns.
async fn drain(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut buf = [0u8; 8192];
    let mut read = 0u64;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while read < LINGER_BYTES {
            match tokio::time::timeout(LINGER_IDLE, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => read += n as u64,
                _ => return,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// The server answers after reading only part of a large upload and
    /// closes: without lingering, the close resets the connection and the
    /// client's upload fails (hyper's client then reports the reset, not
    /// the answer).
    #[tokio::test]
    async fn a_client_still_sending_reads_the_answer_of_a_connection_closed_first() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for _ in 0..20 {
                let (stream, _) = listener.accept().await.unwrap();
                let mut conn = Lingering::new(stream);
                let mut head = [0u8; 1024];
                let _ = conn.read(&mut head).await.unwrap();
                conn.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await
                    .unwrap();
                conn.shutdown().await.unwrap();
                drop(conn);
            }
        });
        let body = vec![b'x'; 4 << 20];
        for round in 0..20 {
            let mut client = TcpStream::connect(at).await.unwrap();
            let (mut r, mut w) = client.split();
            // Like hyper's client, it gives up on the exchange if its
            // upload fails: the whole body must go out.
            let send = async {
                w.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4194304\r\n\r\n")
                    .await?;
                w.write_all(&body).await?;
                w.shutdown().await
            };
            let mut answer = Vec::new();
            let receive = r.read_to_end(&mut answer);
            let (sent, received) = tokio::join!(send, receive);
            sent.unwrap_or_else(|e| panic!("round {round}: the upload failed: {e}"));
            received.unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert!(answer.starts_with(b"HTTP/1.1 413"), "round {round}");
        }
        server.await.unwrap();
    }
}
