//! The delivery contract, checked on what clients logged (Jepsen's way: record everything
//! each client saw, then judge the history as a whole):
//! - no `(epoch, offset)` of a channel is acknowledged to publishers twice;
//! - each subscription's updates are consecutive (`offset == last + 1 + skipped`) from where
//!   its reply put it (the recovered position, or the reply's offset when not recovered), so
//!   nothing is skipped silently and nothing comes twice;
//! - an update carries the payload its `(epoch, offset)` was acknowledged with;
//! - once faults stop, every subscriber reaches the channel's final position.

use std::collections::HashMap;

/// One thing a subscriber saw on one channel.
#[derive(Debug, Clone)]
pub enum Seen {
    /// A subscribe reply; `asked` is the position it asked to recover from.
    Subscribed {
        epoch: String,
        offset: u64,
        asked: Option<(String, u64)>,
        recovered: bool,
    },
    Update {
        offset: u64,
        skipped: u32,
        payload: Vec<u8>,
    },
    /// The connection ended (Disconnect, close or failure): the next entry is a subscribe.
    Ended {
        code: Option<u32>,
    },
}

/// Everything the clients of one run logged.
#[derive(Debug, Default)]
pub struct History {
    /// Per channel: what publishers were acknowledged, in order: (epoch, offset, payload).
    pub acknowledged: HashMap<String, Vec<(String, u64, Vec<u8>)>>,
    /// Per (subscriber, channel): what it saw, in order.
    pub seen: HashMap<(usize, String), Vec<Seen>>,
}

/// What a run amounted to, for the note.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub acknowledged: usize,
    pub delivered: usize,
    pub resubscribes: usize,
    pub told_not_recovered: usize,
    /// Subscriptions closed with 4003 (resync) by the server.
    pub told_to_resync: usize,
}

impl History {
    /// Every breach of the contract, and the tally; `finals` is each channel's position once
    /// the faults stopped (every subscriber must have reached it).
    pub fn check(&self, finals: &HashMap<String, (String, u64)>) -> (Vec<String>, Tally) {
        let mut breaches = Vec::new();
        let mut tally = Tally::default();
        let mut payloads: HashMap<(&str, &str, u64), &[u8]> = HashMap::new();
        for (channel, acks) in &self.acknowledged {
            for (epoch, offset, payload) in acks {
                tally.acknowledged += 1;
                if payloads.insert((channel, epoch, *offset), payload).is_some() {
                    breaches.push(format!("{channel}: ({epoch}, {offset}) acknowledged twice"));
                }
            }
        }
        for ((subscriber, channel), seen) in &self.seen {
            let who = format!("subscriber {subscriber} on {channel}");
            // (epoch, last offset) while subscribed.
            let mut at: Option<(&str, u64)> = None;
            for entry in seen {
                match entry {
                    Seen::Subscribed { epoch, offset, asked, recovered } => {
                        tally.resubscribes += 1;
                        at = match asked {
                            Some((asked_epoch, asked_offset)) if *recovered => {
                                if asked_epoch != epoch {
                                    breaches.push(format!("{who}: recovered from {asked_epoch} into {epoch}"));
                                }
                                Some((epoch, *asked_offset))
                            }
                            _ => {
                                tally.told_not_recovered += usize::from(asked.is_some());
                                Some((epoch, *offset))
                            }
                        };
                    }
                    Seen::Update { offset, skipped, payload } => {
                        tally.delivered += 1;
                        let Some((epoch, last)) = at else {
                            breaches.push(format!("{who}: update {offset} outside a subscription"));
                            continue;
                        };
                        if *offset != last + 1 + u64::from(*skipped) {
                            breaches.push(format!("{who}: in {epoch} after {last} came {offset} (skipped {skipped})"));
                        }
                        if let Some(acked) = payloads.get(&(channel.as_str(), epoch, *offset)) {
                            if acked != payload {
                                breaches.push(format!("{who}: ({epoch}, {offset}) is not what was acknowledged"));
                            }
                        }
                        at = Some((epoch, (*offset).max(last)));
                    }
                    Seen::Ended { code } => {
                        tally.told_to_resync += usize::from(*code == Some(4003));
                        at = None;
                    }
                }
            }
            match (at, finals.get(channel)) {
                (Some((epoch, last)), Some((final_epoch, final_offset))) => {
                    if (epoch, last) != (final_epoch.as_str(), *final_offset) {
                        breaches.push(format!(
                            "{who}: ended at ({epoch}, {last}), the channel at ({final_epoch}, {final_offset})"
                        ));
                    }
                }
                _ => breaches.push(format!("{who}: not subscribed at the end")),
            }
        }
        (breaches, tally)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscribed(epoch: &str, offset: u64, asked: Option<(&str, u64)>, recovered: bool) -> Seen {
        Seen::Subscribed { epoch: epoch.into(), offset, asked: asked.map(|(e, o)| (e.into(), o)), recovered }
    }

    fn update(offset: u64) -> Seen {
        Seen::Update { offset, skipped: 0, payload: vec![offset as u8] }
    }

    fn history(seen: Vec<Seen>) -> History {
        let mut history = History::default();
        let acks = (1..=6).map(|o| ("e1".to_string(), o, vec![o as u8])).collect();
        history.acknowledged.insert("c".into(), acks);
        history.seen.insert((0, "c".into()), seen);
        history
    }

    fn breaches(seen: Vec<Seen>) -> Vec<String> {
        let finals = HashMap::from([("c".to_string(), ("e1".to_string(), 6))]);
        history(seen).check(&finals).0
    }

    #[test]
    fn a_clean_history_with_a_recovery_passes() {
        let seen = vec![
            subscribed("e1", 0, None, false),
            update(1),
            update(2),
            Seen::Ended { code: Some(4003) },
            subscribed("e1", 5, Some(("e1", 2)), true),
            update(3),
            update(4),
            update(5),
            update(6),
        ];
        assert_eq!(breaches(seen), Vec::<String>::new());
    }

    #[test]
    fn a_silent_gap_a_duplicate_a_reused_offset_and_a_stall_are_each_caught() {
        let gap = vec![subscribed("e1", 0, None, false), update(1), update(3), update(4), update(5), update(6)];
        assert_eq!(breaches(gap).len(), 1);
        let duplicate = vec![subscribed("e1", 2, None, false), update(2), update(3), update(4), update(5), update(6)];
        assert_eq!(breaches(duplicate).len(), 1);
        let mut reused = history(vec![subscribed("e1", 5, None, false), update(6)]);
        reused.acknowledged.get_mut("c").unwrap().push(("e1".into(), 6, vec![60]));
        let finals = HashMap::from([("c".to_string(), ("e1".to_string(), 6))]);
        assert_eq!(reused.check(&finals).0.len(), 2, "acknowledged twice, and the payload differs from one");
        let stalled = vec![subscribed("e1", 0, None, false), update(1)];
        assert_eq!(breaches(stalled).len(), 1);
        let told = vec![
            subscribed("e1", 0, None, false),
            update(1),
            Seen::Ended { code: Some(4003) },
            subscribed("e1", 6, Some(("e1", 1)), false),
        ];
        assert_eq!(breaches(told), Vec::<String>::new(), "a recovery refused is the subscriber told");
    }
}
