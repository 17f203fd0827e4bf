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
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use compio::buf::{BufResult, IntoInner, IoBuf};
use compio::driver::SharedFd;
use compio::io::{AsyncRead, AsyncWrite};
use compio::net::TcpStream;
use compio::runtime::{submit_multi, SubmitMulti};
use compio::tls::TlsStream;
use futures_util::{ready, AsyncRead as _, AsyncWrite as _, StreamExt};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendAncillaryBuffer, SendFlags};

use super::readable::Readable;

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

    /// The socket its shard may send on directly, without the writer task (see
    /// `ShardState::send_directly`); `None` when bytes must pass through the writer (TLS).
    fn direct_fd(&self) -> Option<RawFd> {
        None
    }
}

/// Most slices one direct send takes; what is left goes through the writer.
const MAX_SLICES: usize = 64;

/// Sends what the socket takes right now of `head` followed by `parts`, without waiting
/// (`sendmsg(2)`, non-blocking). Returns how many bytes it took: 0 when it would block.
pub(super) fn send_now(fd: RawFd, head: &[u8], parts: &[Bytes]) -> io::Result<usize> {
    // SAFETY: the descriptor belongs to a live connection whose writer task holds the socket
    // (parked, with no write in flight: see `ShardState::send_directly`), so it is open for
    // the whole call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    // rustix makes the system call itself: libc's wrapper adds a cancellation point's
    // bookkeeping to every send.
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
    let sent = if parts.is_empty() {
        rustix::net::send(fd, head, flags)
    } else {
        // On the stack: a paced fan-out batch is shared parts, one such send per subscriber.
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        for (slot, slice) in slices.iter_mut().zip(std::iter::once(head).chain(parts.iter().map(|part| &part[..]))) {
            *slot = IoSlice::new(slice);
            count += 1;
        }
        rustix::net::sendmsg(fd, &slices[..count], &mut SendAncillaryBuffer::default(), flags)
    };
    match sent {
        Ok(sent) => Ok(sent),
        Err(Errno::AGAIN | Errno::INTR) => Ok(0),
        Err(err) => Err(err.into()),
    }
}

/// The bytes of `head` followed by `parts` from `offset` on, in one buffer.
pub(super) fn unsent_after(offset: usize, head: &[u8], parts: &[Bytes]) -> Vec<u8> {
    let mut skip = offset;
    let mut rest = Vec::new();
    for slice in std::iter::once(head).chain(parts.iter().map(|part| &part[..])) {
        let taken = skip.min(slice.len());
        skip -= taken;
        rest.extend_from_slice(&slice[taken..]);
    }
    rest
}

impl Transport for TcpStream {
    type Reader = TcpReader;
    type Writer = TcpStream;

    fn into_halves(self) -> io::Result<(TcpReader, TcpStream)> {
        let (reader, writer) = self.into_split();
        let socket = reader.into_poll_fd()?.into_inner();
        Ok((TcpReader { socket, readable: None, multishot: true, more: false }, writer))
    }
}

/// The reading handle of a plain socket: readiness first, then one non-blocking read.
pub(super) struct TcpReader {
    socket: SharedFd<socket2::Socket>,
    /// Readability events while armed (see `Readable`).
    readable: Option<SubmitMulti<Readable>>,
    /// Arm the poll multishot; false once the kernel refused that.
    multishot: bool,
    /// The last read filled the buffer, so more may be there without a new event.
    more: bool,
}

impl TcpReader {
    /// Whether the socket may have something to read.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let (socket, multishot) = (&self.socket, self.multishot);
            let events = self.readable.get_or_insert_with(|| submit_multi(Readable::new(socket.clone(), multishot)));
            match ready!(events.poll_next_unpin(cx)) {
                Some(BufResult(Ok(_), _)) => return Poll::Ready(Ok(())),
                // Ended (a one-shot poll, or the kernel stopped the multishot one): arm again.
                None => self.readable = None,
                Some(BufResult(Err(_), _)) if self.multishot => {
                    self.readable = None;
                    self.multishot = false;
                }
                Some(BufResult(Err(err), _)) => return Poll::Ready(Err(err)),
            }
        }
    }
}

impl Receive for TcpReader {
    async fn receive(&mut self, mut take: impl FnMut(&[u8])) -> bool {
        loop {
            if std::mem::take(&mut self.more) {
                // More is waiting, but no event will say so: arm the poll afresh, which finds
                // the socket readable at once. That round through the driver lets the shard
                // complete other connections' writes first: a publisher's flood must not hold
                // its shard.
                self.readable = None;
            }
            if poll_fn(|cx| self.poll_readable(cx)).await.is_err() {
                return false;
            }
            let got = RECEIVED.with(|buffer| {
                let mut buffer = buffer.borrow_mut();
                let got = rustix::net::recv(&*self.socket, &mut buffer[..], RecvFlags::DONTWAIT).map(|(n, _)| n);
                if let Ok(n @ 1..) = got {
                    take(&buffer[..n]);
                    // A read that did not fill the buffer took all there was; later arrivals
                    // bring an event of their own.
                    self.more = n == buffer.len();
                }
                got
            });
            match got {
                Ok(1..) => return true,
                Ok(0) => return false,
                // Readiness that another read already took: wait again.
                Err(Errno::AGAIN | Errno::INTR) => continue,
                Err(_) => return false,
            }
        }
    }

    fn direct_fd(&self) -> Option<RawFd> {
        Some(self.socket.as_raw_fd())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_send_left_is_the_rest_of_head_and_parts_in_order() {
        let parts = [Bytes::from_static(b"defg"), Bytes::from_static(b""), Bytes::from_static(b"hij")];
        let all = b"abcdefghij";
        for sent in 0..=all.len() {
            assert_eq!(unsent_after(sent, b"abc", &parts), all[sent..], "after {sent} bytes");
        }
        assert_eq!(unsent_after(1, b"xy", &[]), b"y");
    }
}
