//! How a connection is named inside a shard and in logs.

/// A connection on this shard: slab index and the generation that tells reused slots apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub index: u32,
    pub generation: u32,
}

impl ConnId {
    /// The slot no connection ever has: owners' answers addressed to it go to a request of the
    /// server API waiting on the shard, `generation` being its token.
    const API_SLOT: u32 = u32::MAX;

    /// The requester of a server API request waiting under `token`.
    pub fn api_request(token: u32) -> ConnId {
        ConnId { index: Self::API_SLOT, generation: token }
    }

    /// The token of the server API request this id stands for, if it is one.
    pub fn api_token(self) -> Option<u32> {
        (self.index == Self::API_SLOT).then_some(self.generation)
    }
}

/// How logs and clients name a connection, `<shard>-<slot>-<generation>`: unique in the
/// process, the same on every log line about the connection, and the `client_id` the client
/// is told in `ConnectResult`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLabel {
    pub shard: usize,
    pub conn: ConnId,
}

impl std::fmt::Display for ConnLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.conn.api_token() {
            Some(token) => write!(f, "api-{}-{}", self.shard, token),
            None => write!(f, "{}-{}-{}", self.shard, self.conn.index, self.conn.generation),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_label_names_shard_slot_and_generation() {
        let label = ConnLabel { shard: 3, conn: ConnId { index: 17, generation: 42 } };
        assert_eq!(label.to_string(), "3-17-42");
        let api = ConnLabel { shard: 1, conn: ConnId::api_request(7) };
        assert_eq!(api.to_string(), "api-1-7");
        assert_eq!(api.conn.api_token(), Some(7));
        assert_eq!(label.conn.api_token(), None);
    }
}
