//! A shard's inbox: a bounded lock-free queue that any thread pushes to and only its shard
//! drains, in batches, with at most one wake-up per batch.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;

pub struct Inbox<T> {
    queue: ArrayQueue<T>,
    waker: AtomicWaker,
    /// Set by the first push after the shard last looked; only that push wakes it.
    notified: AtomicBool,
}

impl<T> Inbox<T> {
    pub fn new(capacity: usize) -> Self {
        Self { queue: ArrayQueue::new(capacity), waker: AtomicWaker::new(), notified: AtomicBool::new(false) }
    }

    /// Queues `msg`, handing it back when the inbox is full.
    pub fn push(&self, msg: T) -> Result<(), T> {
        self.queue.push(msg)?;
        if !self.notified.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
        Ok(())
    }

    /// Takes the next message, if any.
    pub fn pop(&self) -> Option<T> {
        self.queue.pop()
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Resolves once messages may be waiting. Only the owning shard calls this.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.notified.swap(false, Ordering::AcqRel) || !self.queue.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn messages_from_other_threads_arrive_in_order_per_sender() {
        let inbox = Arc::new(Inbox::new(1024));
        let senders: Vec<_> = (0..2u64)
            .map(|sender| {
                let inbox = inbox.clone();
                std::thread::spawn(move || {
                    for seq in 0..10_000u64 {
                        let mut msg = (sender, seq);
                        while let Err(back) = inbox.push(msg) {
                            msg = back;
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let runtime = compio::runtime::Runtime::new().unwrap();
        let mut next = [0u64; 2];
        runtime.block_on(async {
            while next.iter().sum::<u64>() < 20_000 {
                inbox.ready().await;
                while let Some((sender, seq)) = inbox.pop() {
                    assert_eq!(seq, next[sender as usize]);
                    next[sender as usize] += 1;
                }
            }
        });
        for sender in senders {
            sender.join().unwrap();
        }
        assert_eq!(next, [10_000, 10_000]);
    }
}
