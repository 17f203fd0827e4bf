//! A socket's readability as a stream of events. On io_uring one multishot poll stays armed
//! while the connection lives, and each arrival posts a completion: a read does not arm,
//! submit and tear down a poll of its own. On the epoll fallback, and on kernels without
//! multishot polls, each event ends the stream (a one-shot poll) and the reader arms it again.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::task::Poll;

use compio::buf::BufResult;
use compio::driver::{Decision, Extra, IourOpCode, OpEntry, OpType, PollOpCode, SharedFd};
use io_uring::{opcode, types::Fd};

/// Readability of one socket, as a multishot operation.
pub(super) struct Readable {
    fd: SharedFd<socket2::Socket>,
    multishot: bool,
    /// The latest event not taken yet. Events that come before the reader looks are one:
    /// its read takes everything that arrived.
    event: Option<BufResult<usize, Extra>>,
}

impl Readable {
    pub fn new(fd: SharedFd<socket2::Socket>, multishot: bool) -> Self {
        Self { fd, multishot, event: None }
    }
}

// SAFETY: the entry refers to the descriptor only, which `fd` keeps open while the
// operation exists.
unsafe impl IourOpCode for Readable {
    type Control = ();

    fn create_entry(&mut self, _: &mut ()) -> OpEntry {
        opcode::PollAdd::new(Fd(self.fd.as_fd().as_raw_fd()), libc::POLLIN as u32).multi(self.multishot).build().into()
    }

    unsafe fn push_multishot(&mut self, _: &mut (), result: io::Result<usize>, extra: Extra) {
        self.event = Some(BufResult(result, extra));
    }

    fn pop_multishot(&mut self, _: &mut ()) -> Option<BufResult<usize, Extra>> {
        self.event.take()
    }
}

// SAFETY: waits for readability of a descriptor `fd` keeps open; nothing is read.
unsafe impl PollOpCode for Readable {
    type Control = ();

    fn pre_submit(&mut self, _: &mut ()) -> io::Result<Decision> {
        Ok(Decision::wait_readable(self.fd.as_fd().as_raw_fd()))
    }

    fn op_type(&mut self, _: &mut ()) -> Option<OpType> {
        Some(OpType::fd(self.fd.as_fd().as_raw_fd()))
    }

    fn operate(&mut self, _: &mut ()) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(0))
    }
}
