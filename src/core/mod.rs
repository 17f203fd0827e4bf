//! The shared vocabulary of every layer: publications, connection ids and labels, channel
//! names and patterns, positions, history pages and recovery outcomes, and the clock.
//! Imports nothing of the crate, so any module may use it.

pub(crate) mod channel;
mod clock;
mod ids;
mod position;
mod publication;
mod scratch;

pub use channel::{validate_channel, ChannelNameError, ChannelPattern};
pub use clock::{clock_us, unix_us, Now, WallClock};
pub use ids::{ConnId, ConnLabel};
pub use position::{HistoryPage, Position, Recovery, RecoveryFailure};
pub use publication::Publication;
pub(crate) use scratch::{borrow_queue, give_back_queue, with_scratch};

/// The hash map of the hot paths (channel tables, subscriber indexes, request timers): a
/// per-process random seed keeps keys the network chooses from colliding on purpose, at a
/// fraction of SipHash's cost for short keys such as channel names.
pub type FastMap<K, V> = hashbrown::HashMap<K, V>;

/// What a panic said, when it said it with a string (for the lines that log a caught panic).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&'static str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "a panic without a message"
    }
}
