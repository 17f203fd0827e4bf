use super::*;
use bytes::Bytes;

fn policy() -> HistoryPolicy {
    HistoryPolicy {
        size: 5,
        ttl: Duration::from_secs(3600),
        recovery_window: Duration::from_secs(300),
        max_recovery_messages: 4,
        max_recovery_bytes: 1 << 20,
        idle_ttl: Duration::from_secs(300),
        max_positions: 2,
        position_ttl: Duration::from_secs(600),
    }
}

fn name(s: &str) -> Arc<str> {
    Arc::from(s)
}

fn publish(table: &mut ChannelTable, channel: &Arc<str>, now: Instant) -> Position {
    let make = |name: &Arc<str>, offset| {
        crate::protocol::push::publication(name.clone(), offset, 1, Bytes::from(vec![0; 10]), now)
    };
    table.publish(channel, now, &mut Vec::new(), make).unwrap().0
}

fn offsets(publications: &[Arc<Publication>]) -> Vec<u64> {
    publications.iter().map(|p| p.offset).collect()
}

fn recovered(recovery: Option<Recovery>) -> Vec<u64> {
    match recovery {
        Some(Recovery::Recovered(publications)) => offsets(&publications),
        other => panic!("expected a recovery, got {other:?}"),
    }
}

fn refused(recovery: Option<Recovery>) -> RecoveryFailure {
    match recovery {
        Some(Recovery::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn offsets_increase_by_one_and_fan_out_follows_subscribers() {
    let now = Instant::now();
    let mut table = ChannelTable::new(3, 100, policy());
    let channel = name("route:1");
    let (start, _) = table.subscribe(&channel, 2, now, None, None).unwrap();
    assert_eq!(start.offset, 0);
    let mut targets = Vec::new();
    let make = |name: &Arc<str>, offset| crate::protocol::push::publication(name.clone(), offset, 1, Bytes::new(), now);
    for expected in 1..=5 {
        let (position, publication) = table.publish(&channel, now, &mut targets, make).unwrap();
        assert_eq!(position, Position { epoch: start.epoch.clone(), offset: expected });
        assert_eq!(publication.offset, expected);
        assert_eq!(targets, vec![2]);
    }
    table.subscribe(&channel, 0, now, None, None).unwrap();
    table.publish(&channel, now, &mut targets, make).unwrap();
    assert_eq!(targets, vec![0, 2]);
    table.unsubscribe(&channel, 2, now);
    table.publish(&channel, now, &mut targets, make).unwrap();
    assert_eq!(targets, vec![0]);
}

#[test]
fn recovery_returns_exactly_the_missed_publications() {
    let now = Instant::now();
    let mut table = ChannelTable::new(1, 100, policy());
    let channel = name("route:1");
    let mut last = Position { epoch: Arc::from(""), offset: 0 };
    for _ in 0..3 {
        last = publish(&mut table, &channel, now);
    }
    let seen = Position { epoch: last.epoch.clone(), offset: 1 };
    let (position, recovery) = table.subscribe(&channel, 0, now, Some(&seen), None).unwrap();
    assert_eq!(position.offset, 3);
    assert_eq!(recovered(recovery), vec![2, 3]);
    let (_, nothing_missed) = table.subscribe(&channel, 0, now, Some(&last), None).unwrap();
    assert_eq!(recovered(nothing_missed), Vec::<u64>::new());
}

#[test]
fn recovery_is_refused_with_the_reason_never_partial() {
    let t0 = Instant::now();
    let mut table = ChannelTable::new(1, 100, policy());
    let channel = name("incident:x");
    let mut last = Position { epoch: Arc::from(""), offset: 0 };
    for _ in 0..8 {
        last = publish(&mut table, &channel, t0);
    }
    let at = |offset| Position { epoch: last.epoch.clone(), offset };
    // History holds 4..=8 (size 5).
    assert_eq!(refused(table.subscribe(&channel, 0, t0, Some(&at(2)), None).unwrap().1), RecoveryFailure::TooMany);
    let mut wide = ChannelTable::new(1, 100, HistoryPolicy { max_recovery_messages: 100, ..policy() });
    for _ in 0..8 {
        publish(&mut wide, &channel, t0);
    }
    let wide_epoch = wide.history(&channel, 0, 1, t0).position.epoch;
    let old = Position { epoch: wide_epoch, offset: 2 };
    assert_eq!(refused(wide.subscribe(&channel, 0, t0, Some(&old), None).unwrap().1), RecoveryFailure::GapTooOld);
    let other_epoch = Position { epoch: Arc::from("0000000000000000"), offset: 7 };
    assert_eq!(
        refused(table.subscribe(&channel, 0, t0, Some(&other_epoch), None).unwrap().1),
        RecoveryFailure::EpochChanged
    );
    assert_eq!(refused(table.subscribe(&channel, 0, t0, Some(&at(9)), None).unwrap().1), RecoveryFailure::OffsetAhead);
    let late = t0 + Duration::from_secs(301);
    assert_eq!(
        refused(table.subscribe(&channel, 0, late, Some(&at(7)), None).unwrap().1),
        RecoveryFailure::WindowExceeded
    );
    let mut small = ChannelTable::new(1, 100, HistoryPolicy { max_recovery_bytes: 15, ..policy() });
    let mut small_last = Position { epoch: Arc::from(""), offset: 0 };
    for _ in 0..3 {
        small_last = publish(&mut small, &channel, t0);
    }
    let since = Position { epoch: small_last.epoch, offset: 1 };
    assert_eq!(refused(small.subscribe(&channel, 0, t0, Some(&since), None).unwrap().1), RecoveryFailure::TooMany);
}

#[test]
fn history_is_trimmed_by_count_and_age_and_pages_exactly() {
    let t0 = Instant::now();
    let mut table = ChannelTable::new(1, 100, policy());
    let channel = name("poi:tile");
    for _ in 0..7 {
        publish(&mut table, &channel, t0);
    }
    let page = table.history(&channel, 0, 100, t0);
    assert_eq!(offsets(&page.publications), vec![3, 4, 5, 6, 7]);
    assert!(page.truncated, "1 and 2 were dropped");
    let page = table.history(&channel, 4, 2, t0);
    assert_eq!(offsets(&page.publications), vec![5, 6]);
    assert!(!page.truncated);
    assert!(table.history(&channel, 7, 10, t0).publications.is_empty());
    let expired = table.history(&channel, 0, 10, t0 + Duration::from_secs(3601));
    assert!(expired.publications.is_empty());
    assert_eq!(expired.position.offset, 7, "offsets survive their history");
    assert!(expired.truncated);
    let unknown = table.history("poi:never", 0, 10, t0);
    assert!(unknown.publications.is_empty() && unknown.position.epoch.is_empty());
    assert_eq!(table.len(), 1, "reading history creates no channel");
}

#[test]
fn idle_channels_are_forgotten_and_come_back_with_a_new_epoch() {
    let t0 = Instant::now();
    let mut table = ChannelTable::new(1, 100, policy());
    let idle = name("poi:idle");
    let held = name("poi:held");
    let first = publish(&mut table, &idle, t0);
    table.subscribe(&held, 0, t0, None, None).unwrap();
    let soon = t0 + Duration::from_secs(600);
    assert_eq!(table.sweep(soon), 0, "history keeps the idle channel alive");
    let later = t0 + Duration::from_secs(3601 + 300);
    assert_eq!(table.sweep(later), 1);
    assert_eq!(table.len(), 1);
    let again = publish(&mut table, &idle, later);
    assert_eq!(again.offset, 1);
    assert_ne!(again.epoch, first.epoch);
}

#[test]
fn a_full_table_refuses_new_channels_but_serves_known_ones() {
    let now = Instant::now();
    let mut table = ChannelTable::new(1, 2, policy());
    let (a, b, c) = (name("a"), name("b"), name("c"));
    publish(&mut table, &a, now);
    table.subscribe(&b, 0, now, None, None).unwrap();
    let make = |name: &Arc<str>, offset| crate::protocol::push::publication(name.clone(), offset, 1, Bytes::new(), now);
    assert_eq!(table.publish(&c, now, &mut Vec::new(), make).err(), Some(TableFull));
    assert_eq!(table.subscribe(&c, 0, now, None, None).err(), Some(TableFull));
    assert_eq!(publish(&mut table, &a, now).offset, 2);
}

#[test]
fn acknowledged_positions_resume_a_client_without_state() {
    let now = Instant::now();
    let mut table = ChannelTable::new(1, 100, policy());
    let channel = name("route:7");
    let epoch = (0..4).map(|_| publish(&mut table, &channel, now)).last().unwrap().epoch;
    let (alice, bob, carol): (Arc<str>, Arc<str>, Arc<str>) = (name("alice"), name("bob"), name("carol"));
    table.ack(&channel, &alice, &epoch, 2, now);
    table.ack(&channel, &alice, &epoch, 1, now);
    table.ack(&channel, &bob, &epoch, 99, now);
    table.ack(&channel, &carol, &epoch, 1, now);
    assert_eq!(recovered(table.subscribe(&channel, 0, now, None, Some("alice")).unwrap().1), vec![3, 4]);
    assert_eq!(recovered(table.subscribe(&channel, 0, now, None, Some("bob")).unwrap().1), Vec::<u64>::new());
    assert!(table.subscribe(&channel, 0, now, None, Some("carol")).unwrap().1.is_none(), "over max_positions");
    assert!(table.subscribe(&channel, 0, now, None, Some("dave")).unwrap().1.is_none());
}

#[test]
fn positions_not_acknowledged_for_position_ttl_are_forgotten() {
    let now = Instant::now();
    let mut table = ChannelTable::new(1, 100, policy());
    let channel = name("route:8");
    let epoch = (0..3).map(|_| publish(&mut table, &channel, now)).last().unwrap().epoch;
    let (alice, bob): (Arc<str>, Arc<str>) = (name("alice"), name("bob"));
    table.ack(&channel, &alice, &epoch, 1, now);
    table.ack(&channel, &bob, &epoch, 1, now);
    let later = now + Duration::from_secs(200);
    table.ack(&channel, &bob, &epoch, 2, later);
    table.sweep(now + Duration::from_secs(700));
    assert!(table.subscribe(&channel, 0, later, None, Some("alice")).unwrap().1.is_none(), "alice was forgotten");
    assert_eq!(recovered(table.subscribe(&channel, 0, later, None, Some("bob")).unwrap().1), vec![3]);
}

#[test]
fn mirror_delivers_new_publications_once_and_flags_a_new_epoch() {
    let now = Instant::now();
    let mut table = ChannelTable::new(2, 100, policy());
    let channel = name("route:m");
    table.add_subscriber(&channel, 1, now).unwrap();
    let at = |offset| Arc::new(crate::protocol::push::publication(channel.clone(), offset, 1, Bytes::new(), now));
    let (e1, e2) = (name("e1"), name("e2"));
    let mut targets = Vec::new();
    assert!(!table.learn(&channel, &e1, 3, &mut targets));
    assert_eq!(table.mirror(&e1, &at(3), now, &mut targets), FanoutOutcome::Seen);
    assert!(targets.is_empty());
    assert_eq!(table.mirror(&e1, &at(4), now, &mut targets), FanoutOutcome::Fresh);
    assert_eq!(targets, vec![1]);
    assert_eq!(offsets(&table.fanned_out_after(&channel, "e1", 3).unwrap()), vec![4]);
    assert_eq!(table.mirror(&e2, &at(1), now, &mut targets), FanoutOutcome::EpochChanged);
    assert_eq!(targets, vec![1]);
    assert_eq!(table.observe(&channel, &e2, 1, &mut targets), FanoutOutcome::Seen, "in step with the broker");
    assert_eq!(table.observe(&channel, &e2, 5, &mut targets), FanoutOutcome::Gap, "publications this node never saw");
    assert_eq!(targets, vec![1]);
}

#[test]
fn an_acknowledgement_of_another_epoch_is_not_remembered() {
    let now = Instant::now();
    let mut table = ChannelTable::new(1, 100, policy());
    let channel = name("route:9");
    let epoch = (0..3).map(|_| publish(&mut table, &channel, now)).last().unwrap().epoch;
    let alice = name("alice");
    table.ack(&channel, &alice, "an-older-epoch", 2, now);
    assert!(table.subscribe(&channel, 0, now, None, Some("alice")).unwrap().1.is_none());
    table.ack(&channel, &alice, &epoch, 2, now);
    assert_eq!(recovered(table.subscribe(&channel, 0, now, None, Some("alice")).unwrap().1), vec![3]);
}

#[test]
fn a_fan_out_past_the_next_offset_is_a_gap_never_a_silent_skip() {
    let now = Instant::now();
    let mut table = ChannelTable::new(2, 100, policy());
    let channel = name("route:gap");
    table.add_subscriber(&channel, 1, now).unwrap();
    let at = |offset| Arc::new(crate::protocol::push::publication(channel.clone(), offset, 1, Bytes::new(), now));
    let e1 = name("e1");
    let mut targets = Vec::new();
    assert!(!table.learn(&channel, &e1, 250, &mut targets));
    assert_eq!(table.mirror(&e1, &at(251), now, &mut targets), FanoutOutcome::Fresh);
    // The node lost Redis while 252..=444 were published elsewhere; 445 is the first it hears.
    assert_eq!(table.mirror(&e1, &at(445), now, &mut targets), FanoutOutcome::Gap);
    assert_eq!(targets, vec![1], "the shards whose subscribers must resync");
    // A subscriber joining at 250 (or 300) would start with a hole: it must ask again.
    assert!(table.fanned_out_after(&channel, "e1", 250).is_none());
    assert!(table.fanned_out_after(&channel, "e1", 300).is_none());
    assert_eq!(offsets(&table.fanned_out_after(&channel, "e1", 444).unwrap()), vec![445]);
    assert_eq!(table.fanned_out_after(&channel, "e1", 445).unwrap().len(), 0);
    // The resync that follows finds nothing more to do, and the next one is in order.
    assert_eq!(table.observe(&channel, &e1, 445, &mut targets), FanoutOutcome::Seen);
    assert_eq!(table.mirror(&e1, &at(446), now, &mut targets), FanoutOutcome::Fresh);
    assert_eq!(
        table.observe(&channel, &name("e2"), 0, &mut targets),
        FanoutOutcome::EpochChanged,
        "a new epoch announced"
    );
}

#[test]
fn a_position_in_another_epoch_than_fanned_out_makes_local_subscribers_resync() {
    let now = Instant::now();
    let mut table = ChannelTable::new(2, 100, policy());
    let channel = name("route:pos");
    table.add_subscriber(&channel, 0, now).unwrap();
    let at = |offset| Arc::new(crate::protocol::push::publication(channel.clone(), offset, 1, Bytes::new(), now));
    let (e1, e2) = (name("e1"), name("e2"));
    let mut targets = Vec::new();
    assert_eq!(table.mirror(&e1, &at(7), now, &mut targets), FanoutOutcome::Fresh);
    table.add_subscriber(&channel, 1, now).unwrap();
    assert!(!table.learn(&channel, &e1, 6, &mut targets), "the same epoch: the joining one catches up");
    assert!(table.learn(&channel, &e2, 2, &mut targets));
    assert_eq!(targets, vec![0, 1]);
    assert_eq!(table.fanned_out_after(&channel, "e1", 0).unwrap().len(), 0, "another epoch: nothing to catch up on");
}

#[test]
fn the_last_subscriber_leaving_forgets_what_was_fanned_out() {
    let now = Instant::now();
    let mut table = ChannelTable::new(1, 100, policy());
    let channel = name("route:quiet");
    table.add_subscriber(&channel, 0, now).unwrap();
    let at = |offset| Arc::new(crate::protocol::push::publication(channel.clone(), offset, 1, Bytes::new(), now));
    let e1 = name("e1");
    let mut targets = Vec::new();
    assert_eq!(table.mirror(&e1, &at(1), now, &mut targets), FanoutOutcome::Fresh);
    assert!(table.unsubscribe(&channel, 0, now));
    // Nobody listened meanwhile; the next subscriber starts from where Redis is.
    table.add_subscriber(&channel, 0, now).unwrap();
    assert!(!table.learn(&channel, &e1, 90, &mut targets));
    assert_eq!(table.mirror(&e1, &at(91), now, &mut targets), FanoutOutcome::Fresh);
}

/// A small deterministic generator for the schedules below (xorshift64*).
struct Schedule(u64);

impl Schedule {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// The owner's logic against random schedules of what Redis does and what reaches the node:
/// publications fanned out or lost on the way, resyncs that read Redis's position at any
/// time (ahead of the fan-out still in flight), new epochs. Whatever the schedule, the
/// subscriber never sees a silent gap: each update it gets is the next offset of the epoch it
/// subscribed in, or it was told to resync first (and subscribes again where Redis stands).
#[test]
fn property_deliveries_are_consecutive_or_a_resync_is_called_for() {
    let (mut delivered, mut resyncs, mut refused) = (0, 0, 0);
    for seed in 1..=500u64 {
        let mut rng = Schedule(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let now = Instant::now();
        let mut table = ChannelTable::new(1, 100, policy());
        let channel = name("route:p");
        table.add_subscriber(&channel, 0, now).unwrap();
        // Redis's side: the epoch, its offset, and the fan-outs on their way to this node.
        let (mut epoch, mut offset, mut epochs) = (name("e0"), 0u64, 0);
        let mut in_flight: VecDeque<(Arc<str>, u64)> = VecDeque::new();
        // The subscriber: the epoch and last offset it has (`after` for the router), or None
        // once told to resync.
        let mut subscriber: Option<(Arc<str>, u64)> = None;
        let mut targets = Vec::new();
        for _ in 0..400 {
            if subscriber.is_none() {
                // Subscribes (again). Its position was read from Redis a while ago: fan-outs
                // after it may have reached the node since, and it catches up on them from the
                // owner, unless the node did not hear them all (then it asks again later).
                let read = offset.saturating_sub(rng.below(4));
                table.learn(&channel, &epoch, read, &mut targets);
                match table.fanned_out_after(&channel, &epoch, read) {
                    Some(catch_up) => {
                        let mut last = read;
                        for publication in &catch_up {
                            assert_eq!(publication.offset, last + 1, "seed {seed}: a catch-up with a hole");
                            last = publication.offset;
                        }
                        subscriber = Some((epoch.clone(), last));
                    }
                    None => refused += 1,
                }
            }
            match rng.below(10) {
                0..=2 => {
                    offset += 1;
                    // Now and then lost on the way: the node was cut off Redis.
                    if rng.below(40) != 0 {
                        in_flight.push_back((epoch.clone(), offset));
                    }
                }
                3..=7 => {
                    let Some((e, o)) = in_flight.pop_front() else { continue };
                    let publication =
                        Arc::new(crate::protocol::push::publication(channel.clone(), o, 1, Bytes::new(), now));
                    match table.mirror(&e, &publication, now, &mut targets) {
                        FanoutOutcome::Fresh if subscriber.is_none() => {}
                        FanoutOutcome::Fresh => {
                            let (se, so) = subscriber.clone().unwrap();
                            if se == e && o <= so {
                                continue; // Its position already counted it (the router's `after`).
                            }
                            assert_eq!((&*e, o), (&*se, so + 1), "seed {seed}: a silent gap");
                            subscriber = Some((e, o));
                            delivered += 1;
                        }
                        FanoutOutcome::EpochChanged | FanoutOutcome::Gap => {
                            subscriber = None;
                            resyncs += 1;
                        }
                        FanoutOutcome::Seen => {}
                    }
                }
                // The bridge reconnected: where Redis stands, read now.
                8 if rng.below(4) == 0
                    && table.observe(&channel, &epoch, offset, &mut targets) != FanoutOutcome::Seen =>
                {
                    subscriber = None;
                    resyncs += 1;
                }
                _ if rng.below(4) == 0 => {
                    // Redis lost the channel or came back older: a new epoch.
                    epochs += 1;
                    epoch = name(&format!("e{epochs}"));
                    offset = 0;
                }
                _ => {}
            }
        }
    }
    // Fixed schedules: 41,221 deliveries, 12,114 resyncs called for, 4,831 joins asked again.
    let exercised = delivered > 30_000 && resyncs > 5_000 && refused > 1_000;
    assert!(exercised, "the schedules exercised each: {delivered} {resyncs} {refused}");
}

#[test]
fn a_history_with_holes_is_never_used_for_recovery() {
    let now = Instant::now();
    let channel = name("route:holes");
    let at = |offset| Arc::new(crate::protocol::push::publication(channel.clone(), offset, 1, Bytes::new(), now));
    let history: VecDeque<Arc<Publication>> = [at(3), at(7), at(8)].into_iter().collect();
    let since = Position { epoch: name("e"), offset: 6 };
    let recovery = recover("e", 8, &history, &since, now, &HistoryPolicy { max_recovery_messages: 100, ..policy() });
    assert_eq!(refused(Some(recovery)), RecoveryFailure::GapTooOld);
}

#[test]
fn channels_list_by_prefix_in_name_order_and_page_after_a_name() {
    let mut table = ChannelTable::new(2, 100, policy());
    let now = Instant::now();
    for n in [5, 1, 3, 2, 4] {
        table.subscribe(&name(&format!("route:{n}")), n % 2, now, None, None).unwrap();
    }
    table.subscribe(&name("route:3"), 0, now, None, None).unwrap();
    publish(&mut table, &name("weather:x"), now);
    let names = |list: Vec<ChannelSummary>| list.iter().map(|c| c.name.to_string()).collect::<Vec<_>>();
    assert_eq!(names(table.list("route:", "", 2)), ["route:1", "route:2"]);
    assert_eq!(names(table.list("route:", "route:2", 2)), ["route:3", "route:4"]);
    assert_eq!(names(table.list("route:", "route:4", 2)), ["route:5"]);
    assert_eq!(names(table.list("", "", 10)).len(), 6);
    let three = &table.list("route:3", "", 10)[0];
    assert_eq!((three.subscribers, three.position.offset), (2, 0));
    assert_eq!(table.list("weather:", "", 10)[0].position.offset, 1);
}
