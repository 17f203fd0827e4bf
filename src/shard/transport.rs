//! The byte stream under a connection: plain TCP, or TLS over it. Before the upgrade one task
//! reads and writes it; after, it splits into a reader half and a writer half driven by two
//! tasks. Plain TCP splits into two handles of the same socket, exactly as without TLS, so
//! `ws://` pays nothing for `wss://` being possible.
//!
//! A reader holds no receive buffer while it waits: it waits for the socket to become
//! readable (io_uring poll or epoll alike), then reads into the one buffer its shard thread
//! shares by all its connections, and hands the bytes on before the next wait.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use compio::buf::{BufResult, IoBuf};
use compio::io::{AsyncRead, AsyncWrite};
use compio::net::TcpStream;
use compio::runtime::fd::PollFd;
use compio::tls::TlsStream;
use futures_util::{AsyncRead as _, AsyncWrite as _};

/// How long a closing TLS connection may take to send its `close_notify`.
const CLOSE_NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);

/// Size of the receive buffer each shard thread shares by all its connections: large, so a
/// busy publisher's commands are taken in large batches (which makes fan-out batches large).
const RECEIVE_BUFFER: usize = 256 * 1024;

thread_local! {
    /// Pages of it become resident only as far as reads have filled it.
    static RECEIVED: RefCell<Box<[u8]>> = RefCell::new(vec![0; RECEIVE_BUFFER].into_boxed_slice());
}

/// A connection's stream and the halves its reader and writer tasks use.
pub(super) trait Transport: AsyncRead + AsyncWrite + Sized + 'static {
    type Reader: Receive + 'static;
    type Writer: AsyncWrite + 'static;

    fn into_halves(self) -> io::Result<(Self::Reader, Self::Writer)>;

    /// What the writer sends after the last bytes of the connection, if anything.
    async fn say_goodbye(_writer: &mut Self::Writer) {}
}

/// The reading side of an upgraded connection.
pub(super) trait Receive {
    /// Waits until the peer sent something and hands what arrived to `take`. Returns false
    /// once the peer left or the connection failed.
    async fn receive(&mut self, take: impl FnMut(&[u8])) -> bool;
}

impl Transport for TcpStream {
    type Reader = TcpReader;
    type Writer = TcpStream;

    fn into_halves(self) -> io::Result<(TcpReader, TcpStream)> {
        let (reader, writer) = self.into_split();
        Ok((TcpReader(reader.into_poll_fd()?), writer))
    }
}

/// The reading handle of a plain socket: readiness first, then one non-blocking read.
pub(super) struct TcpReader(PollFd<socket2::Socket>);

impl Receive for TcpReader {
    async fn receive(&mut self, mut take: impl FnMut(&[u8])) -> bool {
        loop {
            if self.0.read_ready().await.is_err() {
                return false;
            }
            let got = RECEIVED.with(|buffer| {
                let mut buffer = buffer.borrow_mut();
                // SAFETY: recv(2) writes at most `buffer.len()` bytes into a buffer this thread
                // holds exclusively; the socket stays open while its reader exists.
                let n = unsafe {
                    libc::recv(self.0.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), libc::MSG_DONTWAIT)
                };
                if n > 0 {
                    take(&buffer[..n as usize]);
                }
                n
            });
            match got {
                1.. => return true,
                0 => return false,
                _ => match io::Error::last_os_error().kind() {
                    // Readiness that another read already took: wait again.
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                    _ => return false,
                },
            }
        }
    }
}

impl Transport for TlsStream<TcpStream> {
    type Reader = TlsReader;
    type Writer = TlsWriter;

    fn into_halves(self) -> io::Result<(TlsReader, TlsWriter)> {
        let shared = Rc::new(SharedTls { stream: RefCell::new(self), parked_writer: Cell::new(None) });
        Ok((TlsReader(shared.clone()), TlsWriter(shared)))
    }

    async fn say_goodbye(writer: &mut TlsWriter) {
        let shared = &writer.0;
        let close_notify = poll_fn(|cx| Pin::new(&mut *shared.stream.borrow_mut()).poll_close(cx));
        let _ = compio::time::timeout(CLOSE_NOTIFY_TIMEOUT, close_notify).await;
    }
}

/// One TLS session used by two tasks. Each borrows it only inside a poll (never across an
/// await), so a read waiting for bytes never holds up a write.
struct SharedTls {
    stream: RefCell<TlsStream<TcpStream>>,
    /// The writer task while its write waits on the socket.
    parked_writer: Cell<Option<Waker>>,
}

pub(super) struct TlsReader(Rc<SharedTls>);

pub(super) struct TlsWriter(Rc<SharedTls>);

impl Receive for TlsReader {
    async fn receive(&mut self, mut take: impl FnMut(&[u8])) -> bool {
        let shared = &self.0;
        poll_fn(|cx| {
            RECEIVED.with(|buffer| {
                let mut buffer = buffer.borrow_mut();
                let polled = Pin::new(&mut *shared.stream.borrow_mut()).poll_read(cx, &mut buffer);
                // A read may have written (a TLS alert) through the socket's write slot and so
                // taken over the wake-up of a parked writer: let the writer look again.
                if let Some(writer) = shared.parked_writer.take() {
                    writer.wake();
                }
                match polled {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(n)) if n > 0 => {
                        take(&buffer[..n]);
                        Poll::Ready(true)
                    }
                    // A peer that closes the socket without `close_notify` has simply left too.
                    Poll::Ready(_) => Poll::Ready(false),
                }
            })
        })
        .await
    }
}

impl TlsWriter {
    /// Encrypts `bytes` (all of them, or the error) and hands the records to the socket.
    async fn send(&self, bytes: &[u8]) -> io::Result<usize> {
        let shared = &self.0;
        let park = |cx: &mut std::task::Context<'_>| shared.parked_writer.set(Some(cx.waker().clone()));
        let written = poll_fn(|cx| {
            let polled = Pin::new(&mut *shared.stream.borrow_mut()).poll_write(cx, bytes);
            if polled.is_pending() {
                park(cx);
            }
            polled
        })
        .await?;
        poll_fn(|cx| {
            let polled = Pin::new(&mut *shared.stream.borrow_mut()).poll_flush(cx);
            if polled.is_pending() {
                park(cx);
            }
            polled
        })
        .await?;
        Ok(written)
    }
}

impl AsyncWrite for TlsWriter {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        let result = self.send(buf.as_init()).await;
        BufResult(result, buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        let shared = &self.0;
        poll_fn(|cx| Pin::new(&mut *shared.stream.borrow_mut()).poll_close(cx)).await
    }
}
