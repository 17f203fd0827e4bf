//! Where a channel stands, what its history holds, and what a recovery gave.

use std::sync::Arc;

use super::Publication;

/// Where a channel stands: its epoch and the offset of its latest publication (0 = none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Arc<str>,
    pub offset: u64,
}

/// Why a recovery was refused; the client must resync from its source of truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryFailure {
    /// The channel's history was lost (new process, channel forgotten): the epoch differs.
    EpochChanged,
    /// History no longer holds the publication after the client's offset.
    GapTooOld,
    /// The first missed publication is older than the recovery window.
    WindowExceeded,
    /// More publications (or bytes) missed than one recovery may carry.
    TooMany,
    /// The client claims an offset the channel never reached.
    OffsetAhead,
}

/// The outcome of a subscription that asked to recover from a position.
#[derive(Debug, Clone)]
pub enum Recovery {
    /// Every missed publication, oldest first (possibly none).
    Recovered(Vec<Arc<Publication>>),
    Refused(RecoveryFailure),
}

/// A range read from history.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub position: Position,
    pub publications: Vec<Arc<Publication>>,
    /// Publications after the asked offset were already dropped: the page starts later.
    pub truncated: bool,
}
