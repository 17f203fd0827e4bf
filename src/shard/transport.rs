//! The byte stream under a connection: plain TCP, or TLS over it. Before the upgrade one task
//! reads and writes it; after, it splits into a reader half and a writer half driven by two
//! tasks. Plain TCP splits into two handles of the same socket, exactly as without TLS, so
//! `ws://` pays nothing for `wss://` being possible.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Waker;
use std::time::Duration;

use compio::buf::{BufResult, IoBuf, IoBufMut};
use compio::io::{AsyncRead, AsyncWrite};
use compio::net::TcpStream;
use compio::tls::TlsStream;
use futures_util::{AsyncRead as _, AsyncWrite as _};

/// How long a closing TLS connection may take to send its `close_notify`.
const CLOSE_NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection's stream and the halves its reader and writer tasks use.
pub(super) trait Transport: AsyncRead + AsyncWrite + Sized + 'static {
    type Reader: AsyncRead + 'static;
    type Writer: AsyncWrite + 'static;

    fn into_halves(self) -> (Self::Reader, Self::Writer);

    /// What the writer sends after the last bytes of the connection, if anything.
    async fn say_goodbye(_writer: &mut Self::Writer) {}
}

impl Transport for TcpStream {
    type Reader = TcpStream;
    type Writer = TcpStream;

    fn into_halves(self) -> (TcpStream, TcpStream) {
        self.into_split()
    }
}

impl Transport for TlsStream<TcpStream> {
    type Reader = TlsReader;
    type Writer = TlsWriter;

    fn into_halves(self) -> (TlsReader, TlsWriter) {
        let shared = Rc::new(SharedTls { stream: RefCell::new(self), parked_writer: Cell::new(None) });
        (TlsReader(shared.clone()), TlsWriter(shared))
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

impl AsyncRead for TlsReader {
    async fn read<B: IoBufMut>(&mut self, mut buf: B) -> BufResult<usize, B> {
        let shared = &self.0;
        let slice = buf.ensure_init();
        let result = poll_fn(|cx| {
            let polled = Pin::new(&mut *shared.stream.borrow_mut()).poll_read(cx, slice);
            // A read may have written (a TLS alert) through the socket's write slot and so
            // taken over the wake-up of a parked writer: let the writer look again.
            if let Some(writer) = shared.parked_writer.take() {
                writer.wake();
            }
            polled
        })
        .await;
        let result = match result {
            Ok(n) => {
                // SAFETY: `ensure_init` initialised the whole buffer; `n` bytes of it were read.
                unsafe { buf.advance_to(n) };
                Ok(n)
            }
            // A peer that closes the socket without `close_notify` has simply left.
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            Err(err) => Err(err),
        };
        BufResult(result, buf)
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
