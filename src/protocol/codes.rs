//! The documented tables of `Error` codes (replies; the connection stays open) and close codes
//! (`Disconnect` frames and WebSocket close frames; the connection ends).

/// Codes of `Error` replies. They follow the meaning of the HTTP status of the same number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// The command is malformed: a missing or invalid field, or a bad channel name.
    BadRequest = 400,
    /// A token was refused (`Refresh`; the reason says why), or the connection's token
    /// expired and the command waits for a `Refresh`.
    TokenRefused = 401,
    /// The token does not allow this channel, or a `Refresh` names another subject.
    Forbidden = 403,
    /// No such subscription on this connection.
    NotFound = 404,
    /// The channel is already subscribed on this connection.
    AlreadySubscribed = 409,
    /// A size or count limit was exceeded (payload, subscriptions).
    TooLarge = 413,
    /// Rate limited; see `retry_after_ms`.
    RateLimited = 429,
    /// The frame names no command this server knows.
    UnknownCommand = 450,
    /// The server failed; the command may be retried.
    Internal = 500,
    /// The command is part of the protocol but this server does not implement it yet.
    NotImplemented = 501,
    /// The server is overloaded or shutting down; retry later.
    Unavailable = 503,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadRequest,
        ErrorCode::TokenRefused,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::AlreadySubscribed,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::UnknownCommand,
        ErrorCode::Internal,
        ErrorCode::NotImplemented,
        ErrorCode::Unavailable,
    ];

    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Why the server ends a connection. The code goes out in the `Disconnect` frame and in the
/// WebSocket close frame. 4000–4499: reconnecting may succeed; 4500–4999: do not reconnect
/// without changing something. 1000–1011 are RFC 6455's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: normal closure, asked for by the client.
    Normal,
    /// 1002: WebSocket protocol violation (bad framing, unmasked client frame, bad opcode).
    ProtocolError,
    /// 1003: a text message; the protocol is binary protobuf only.
    UnsupportedData,
    /// 1007: text that is not UTF-8 (a text message, or a close frame's reason).
    InvalidPayload,
    /// 1009: a message over `limits.max_message_size`.
    MessageTooBig,
    /// 1011: an internal error of the server.
    InternalError,
    /// 4000: the server is shutting down; reconnect (to another node).
    Shutdown,
    /// 4001: the connection could not keep up with its updates (outbox over its byte limit).
    SlowConsumer,
    /// 4003: a subscribed channel's history changed under the server (the broker lost it or
    /// this node missed publications while Redis was away): reconnect and recover.
    Resubscribe,
    /// 4004: no `Connect` within `limits.connect_timeout` of the upgrade.
    ConnectTimeout,
    /// 4005: nothing heard from the client within `heartbeat.timeout` (pings unanswered).
    HeartbeatTimeout,
    /// 4006: the token expired and no `Refresh` came within `auth.expiry_grace`; reconnect
    /// with a fresh token.
    TokenExpired,
    /// 4500: a message that does not decode as the protocol's protobuf (or bad zstd).
    BadMessage,
    /// 4501: a first command other than `Connect`, or a second `Connect`.
    BadLifecycle,
    /// 4502: more frames in one message than `limits.max_frames_per_message`.
    TooManyFrames,
    /// 4503: the token in `Connect` was refused (missing, malformed, `alg: none`, wrong
    /// algorithm, bad signature, expired, not yet valid, wrong audience or issuer); the
    /// `Disconnect` reason says which.
    Unauthorized,
    /// 4504: requests kept coming after `rate_limits.max_refusals` refusals in a row.
    RateLimitAbuse,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::ProtocolError => 1002,
            CloseCode::UnsupportedData => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::MessageTooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::Shutdown => 4000,
            CloseCode::SlowConsumer => 4001,
            CloseCode::Resubscribe => 4003,
            CloseCode::ConnectTimeout => 4004,
            CloseCode::HeartbeatTimeout => 4005,
            CloseCode::TokenExpired => 4006,
            CloseCode::BadMessage => 4500,
            CloseCode::BadLifecycle => 4501,
            CloseCode::TooManyFrames => 4502,
            CloseCode::Unauthorized => 4503,
            CloseCode::RateLimitAbuse => 4504,
        }
    }

    /// Whether a client should reconnect after this close.
    pub fn reconnect(self) -> bool {
        matches!(
            self,
            CloseCode::Normal
                | CloseCode::InternalError
                | CloseCode::Shutdown
                | CloseCode::SlowConsumer
                | CloseCode::Resubscribe
                | CloseCode::ConnectTimeout
                | CloseCode::HeartbeatTimeout
                | CloseCode::TokenExpired
        )
    }

    /// Short label, used in logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::ProtocolError => "protocol_error",
            CloseCode::UnsupportedData => "text_message",
            CloseCode::InvalidPayload => "invalid_utf8",
            CloseCode::MessageTooBig => "message_too_big",
            CloseCode::InternalError => "internal_error",
            CloseCode::Shutdown => "shutdown",
            CloseCode::SlowConsumer => "slow_consumer",
            CloseCode::Resubscribe => "resubscribe",
            CloseCode::ConnectTimeout => "connect_timeout",
            CloseCode::HeartbeatTimeout => "heartbeat_timeout",
            CloseCode::TokenExpired => "token_expired",
            CloseCode::BadMessage => "bad_message",
            CloseCode::BadLifecycle => "bad_lifecycle",
            CloseCode::TooManyFrames => "too_many_frames",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::RateLimitAbuse => "rate_limit_abuse",
        }
    }

    pub const ALL: [CloseCode; 17] = [
        CloseCode::Normal,
        CloseCode::ProtocolError,
        CloseCode::UnsupportedData,
        CloseCode::InvalidPayload,
        CloseCode::MessageTooBig,
        CloseCode::InternalError,
        CloseCode::Shutdown,
        CloseCode::SlowConsumer,
        CloseCode::Resubscribe,
        CloseCode::ConnectTimeout,
        CloseCode::HeartbeatTimeout,
        CloseCode::TokenExpired,
        CloseCode::BadMessage,
        CloseCode::BadLifecycle,
        CloseCode::TooManyFrames,
        CloseCode::Unauthorized,
        CloseCode::RateLimitAbuse,
    ];
}
