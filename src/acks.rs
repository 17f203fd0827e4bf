//! Acknowledged delivery of one subscription, sans I/O: which updates were sent and not yet
//! acknowledged, when each is due again, and when one has failed for good.
//!
//! Call order: [`AckTracker::sent`] for every update delivered on the subscription,
//! [`AckTracker::ack`] when the client acknowledges an offset (cumulatively), and
//! [`AckTracker::due`] whenever the clock passes [`AckTracker::next_deadline`].

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::Publication;

/// How acknowledged delivery behaves.
#[derive(Debug, Clone)]
pub struct AckPolicy {
    /// An update not acknowledged this long after it was sent is sent again.
    pub timeout: Duration,
    /// Sends after the first; an update still unacknowledged then has failed.
    pub max_redeliveries: u32,
    /// Updates awaiting acknowledgement per subscription; the oldest beyond it has failed.
    pub max_unacked: usize,
}

impl AckPolicy {
    /// The acknowledged-delivery policy every session applies under `config`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            timeout: config.acks.timeout,
            max_redeliveries: config.acks.max_redeliveries,
            max_unacked: config.acks.max_unacked,
        }
    }
}

#[derive(Debug)]
struct Unacked {
    publication: Rc<Publication>,
    sent_at: Instant,
    redeliveries: u32,
}

/// What `due` decided.
#[derive(Debug, Default)]
pub struct Due {
    /// Updates to send again, oldest deadline first.
    pub resend: Vec<Rc<Publication>>,
    /// Updates given up on (redelivered `max_redeliveries` times without an acknowledgement).
    pub failed: u32,
}

#[derive(Debug)]
pub struct AckTracker {
    policy: Rc<AckPolicy>,
    /// Ordered by `sent_at`.
    unacked: VecDeque<Unacked>,
    acked: u64,
    /// The epoch the subscription's offsets belong to (set when the subscription is
    /// answered), so an acknowledged position is never applied to another epoch.
    pub epoch: Arc<str>,
}

impl AckTracker {
    pub fn new(policy: Rc<AckPolicy>) -> Self {
        Self { policy, unacked: VecDeque::new(), acked: 0, epoch: Arc::from("") }
    }

    /// An update went out; returns how many older ones failed to make room.
    pub fn sent(&mut self, publication: &Rc<Publication>, now: Instant) -> u32 {
        let mut failed = 0;
        while self.unacked.len() >= self.policy.max_unacked {
            self.unacked.pop_front();
            failed += 1;
        }
        self.unacked.push_back(Unacked { publication: publication.clone(), sent_at: now, redeliveries: 0 });
        failed
    }

    /// The client processed everything up to `offset`: each update that settles is handed to
    /// `settled`. Returns how many settled.
    pub fn ack(&mut self, offset: u64, mut settled: impl FnMut(&Publication)) -> usize {
        self.acked = self.acked.max(offset);
        let before = self.unacked.len();
        self.unacked.retain(|u| {
            let done = u.publication.offset <= offset;
            if done {
                settled(&u.publication);
            }
            !done
        });
        before - self.unacked.len()
    }

    /// The highest offset acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Updates whose deadline passed: sent again, or failed after `max_redeliveries`.
    pub fn due(&mut self, now: Instant) -> Due {
        let mut due = Due::default();
        while let Some(front) = self.unacked.front() {
            if now.saturating_duration_since(front.sent_at) < self.policy.timeout {
                break;
            }
            let Some(mut entry) = self.unacked.pop_front() else { break };
            if entry.redeliveries >= self.policy.max_redeliveries {
                due.failed += 1;
                continue;
            }
            entry.redeliveries += 1;
            entry.sent_at = now;
            due.resend.push(entry.publication.clone());
            self.unacked.push_back(entry);
        }
        due
    }

    /// When `due` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.unacked.front().map(|u| u.sent_at + self.policy.timeout)
    }

    pub fn pending(&self) -> usize {
        self.unacked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;

    fn tracker(max_unacked: usize) -> AckTracker {
        AckTracker::new(Rc::new(AckPolicy { timeout: Duration::from_secs(5), max_redeliveries: 2, max_unacked }))
    }

    fn publication(offset: u64) -> Rc<Publication> {
        Rc::new(crate::protocol::push::publication(Arc::from("route:1"), offset, 1, Bytes::new(), Instant::now()))
    }

    fn offsets(list: &[Rc<Publication>]) -> Vec<u64> {
        list.iter().map(|p| p.offset).collect()
    }

    #[test]
    fn unacked_updates_are_resent_after_the_timeout_then_fail() {
        let t0 = Instant::now();
        let mut acks = tracker(100);
        acks.sent(&publication(1), t0);
        acks.sent(&publication(2), t0 + Duration::from_secs(1));
        assert!(acks.due(t0 + Duration::from_secs(4)).resend.is_empty());
        assert_eq!(acks.next_deadline(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(offsets(&acks.due(t0 + Duration::from_secs(5)).resend), vec![1]);
        assert_eq!(offsets(&acks.due(t0 + Duration::from_secs(6)).resend), vec![2]);
        assert_eq!(offsets(&acks.due(t0 + Duration::from_secs(10)).resend), vec![1]);
        let last = acks.due(t0 + Duration::from_secs(20));
        assert_eq!(offsets(&last.resend), vec![2]);
        assert_eq!(last.failed, 1, "1 was redelivered twice already");
        let end = acks.due(t0 + Duration::from_secs(40));
        assert!(end.resend.is_empty());
        assert_eq!(end.failed, 1);
        assert_eq!(acks.pending(), 0);
    }

    #[test]
    fn cumulative_ack_settles_everything_up_to_the_offset() {
        let t0 = Instant::now();
        let mut acks = tracker(100);
        for offset in 1..=5 {
            acks.sent(&publication(offset), t0);
        }
        assert_eq!(acks.ack(3, |_| {}), 3);
        assert_eq!(acks.acked(), 3);
        assert_eq!(offsets(&acks.due(t0 + Duration::from_secs(5)).resend), vec![4, 5]);
        assert_eq!(acks.ack(2, |_| {}), 0, "an older ack changes nothing");
        assert_eq!(acks.acked(), 3);
    }

    #[test]
    fn too_many_unacked_fails_the_oldest() {
        let t0 = Instant::now();
        let mut acks = tracker(2);
        assert_eq!(acks.sent(&publication(1), t0), 0);
        assert_eq!(acks.sent(&publication(2), t0), 0);
        assert_eq!(acks.sent(&publication(3), t0), 1);
        assert_eq!(offsets(&acks.due(t0 + Duration::from_secs(5)).resend), vec![2, 3]);
    }
}
