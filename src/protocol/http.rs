//! The HTTP/1.1 request head that starts every connection, and the few responses the server
//! writes before (or instead of) switching to WebSocket.

/// What a complete request head asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    /// The query string, without `?` (empty when absent).
    pub query: String,
    /// `Some` when the head is a well-formed WebSocket upgrade; carries `Sec-WebSocket-Key`.
    pub websocket_key: Option<String>,
    /// Why an upgrade attempt is not acceptable (for the 400 body).
    pub upgrade_problem: Option<&'static str>,
    /// The headers a request with a body (the server API) needs.
    pub body: BodyHeaders,
}

/// What a request says about its body and who sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyHeaders {
    /// `Content-Length`: `Some(Err(()))` when present but not a number.
    pub content_length: Option<Result<usize, ()>>,
    /// `Transfer-Encoding` is present (a chunked body).
    pub transfer_encoding: bool,
    /// `Content-Type` without parameters, lowercase.
    pub content_type: Option<String>,
    /// `Accept` as sent.
    pub accept: Option<String>,
    /// `Authorization` as sent.
    pub authorization: Option<String>,
    /// `Expect: 100-continue`: the client waits for a `100 Continue` before its body.
    pub expect_continue: bool,
}

/// Why a request head was refused; `status()` is the HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head larger than the limit")]
    TooLarge,
    #[error("too many request headers")]
    TooManyHeaders,
    #[error("malformed HTTP request")]
    Malformed,
    /// The head frames its body two ways (RFC 9112 §6.3: a server must refuse it, as a
    /// proxy ahead may have read the body the other way: request smuggling).
    #[error("ambiguous body length: {0}")]
    AmbiguousLength(&'static str),
}

impl HeadError {
    pub fn status(self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::Malformed | HeadError::AmbiguousLength(_) => 400,
        }
    }
}

/// Parses a request head from the start of `buf`: `Ok(None)` while incomplete, else the head
/// and the bytes it used. Refuses heads over `max_bytes` or with over `max_headers` headers.
pub fn parse_head(buf: &[u8], max_bytes: usize, max_headers: usize) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let mut request = httparse::Request::new(&mut headers);
    let consumed = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_bytes => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(_) => return Err(HeadError::Malformed),
    };
    if consumed > max_bytes {
        return Err(HeadError::TooLarge);
    }
    let method = request.method.ok_or(HeadError::Malformed)?.to_owned();
    let target = request.path.ok_or(HeadError::Malformed)?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    let (websocket_key, upgrade_problem) = if method != "GET" {
        (None, Some("WebSocket upgrade needs GET"))
    } else if !has_token("upgrade", "websocket") {
        (None, Some("missing `Upgrade: websocket`"))
    } else if !has_token("connection", "upgrade") {
        (None, Some("missing `Connection: Upgrade`"))
    } else if header("sec-websocket-version") != Some("13") {
        (None, Some("`Sec-WebSocket-Version` must be 13"))
    } else {
        match header("sec-websocket-key") {
            Some(key) if is_valid_key(key) => (Some(key.to_owned()), None),
            _ => (None, Some("missing or invalid `Sec-WebSocket-Key`")),
        }
    };
    let content_length = content_length(request.headers)?;
    let transfer_encoding = request.headers.iter().any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
    if transfer_encoding && content_length.is_some() {
        return Err(HeadError::AmbiguousLength("both Transfer-Encoding and Content-Length"));
    }
    let body = BodyHeaders {
        content_length,
        transfer_encoding,
        content_type: header("content-type")
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()),
        accept: header("accept").map(str::to_owned),
        authorization: header("authorization").map(str::to_owned),
        expect_continue: header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")),
    };
    let head =
        RequestHead { method, path: path.to_owned(), query: query.to_owned(), websocket_key, upgrade_problem, body };
    Ok(Some((head, consumed)))
}

/// The `Content-Length` of a head: `None` when absent, `Some(Err(()))` when not a number. The
/// same number repeated (in several fields or a list) is that number (RFC 9110 §8.6);
/// different numbers are refused.
fn content_length(headers: &[httparse::Header<'_>]) -> Result<Option<Result<usize, ()>>, HeadError> {
    let mut length: Option<Result<usize, ()>> = None;
    let values = headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length"));
    for value in values.flat_map(|h| h.value.split(|&b| b == b',')) {
        let parsed = std::str::from_utf8(value).ok().and_then(|v| v.trim().parse::<usize>().ok()).ok_or(());
        match length {
            Some(seen) if seen != parsed => {
                return Err(HeadError::AmbiguousLength("Content-Length fields with different values"))
            }
            _ => length = Some(parsed),
        }
    }
    Ok(length)
}

/// A key is the base64 of 16 bytes: 22 characters and `==`.
fn is_valid_key(key: &str) -> bool {
    key.len() == 24
        && key.ends_with("==")
        && key[..22].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// The `101 Switching Protocols` answer to an upgrade with `key`.
pub fn upgrade_response(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// A complete response that closes the connection after it.
pub fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    response_with_header(status, content_type, None, body)
}

/// A complete response with one extra header line (`name: value`), closing the connection.
pub fn response_with_header(status: u16, content_type: &str, header: Option<(&str, &str)>, body: &[u8]) -> Vec<u8> {
    let extra = header.map(|(name, value)| format!("{name}: {value}\r\n")).unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{extra}Connection: close\r\n\r\n",
        reason_phrase(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A plain-text error response.
pub fn error_response(status: u16, message: &str) -> Vec<u8> {
    response(status, "text/plain; charset=utf-8", format!("{message}\n").as_bytes())
}

/// A plain-text error response that tells the client how many seconds to wait
/// (`Retry-After`).
pub fn retry_after_response(status: u16, retry_after_secs: u64, message: &str) -> Vec<u8> {
    let seconds = retry_after_secs.to_string();
    let body = format!("{message}\n");
    response_with_header(status, "text/plain; charset=utf-8", Some(("Retry-After", &seconds)), body.as_bytes())
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /ws?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn upgrade_is_recognised() {
        let (head, used) = parse_head(UPGRADE.as_bytes(), 8192, 32).unwrap().unwrap();
        assert_eq!(used, UPGRADE.len());
        assert_eq!(head.path, "/ws");
        assert_eq!(head.query, "x=1");
        assert_eq!(head.websocket_key.as_deref(), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        let response = String::from_utf8(upgrade_response("dGhlIHNhbXBsZSBub25jZQ==")).unwrap();
        assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    }

    #[test]
    fn partial_head_waits_and_oversized_head_is_431() {
        let partial = &UPGRADE.as_bytes()[..40];
        assert_eq!(parse_head(partial, 8192, 32), Ok(None));
        assert_eq!(parse_head(partial, 40, 32), Err(HeadError::TooLarge));
        assert_eq!(parse_head(UPGRADE.as_bytes(), 64, 32), Err(HeadError::TooLarge));
        assert_eq!(parse_head(UPGRADE.as_bytes(), 8192, 3).map_err(HeadError::status), Err(431));
    }

    #[test]
    fn a_body_framed_two_ways_is_refused() {
        let head = |headers: &str| format!("POST /api/publish HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        let parse = |headers: &str| parse_head(head(headers).as_bytes(), 8192, 32).map(|h| h.map(|(h, _)| h.body));
        assert_eq!(parse("Content-Length: 5\r\n").unwrap().unwrap().content_length, Some(Ok(5)));
        assert_eq!(parse("Content-Length: 5\r\nContent-Length: 5\r\n").unwrap().unwrap().content_length, Some(Ok(5)));
        assert_eq!(parse("Content-Length: 5, 5\r\n").unwrap().unwrap().content_length, Some(Ok(5)));
        assert_eq!(parse("Content-Length: five\r\n").unwrap().unwrap().content_length, Some(Err(())));
        for ambiguous in [
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: 5, 6\r\n",
            "Content-Length: 5\r\ncontent-length: five\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
        ] {
            let refused = parse(ambiguous).unwrap_err();
            assert!(matches!(refused, HeadError::AmbiguousLength(_)), "{ambiguous:?}: {refused:?}");
            assert_eq!(refused.status(), 400);
        }
        assert!(parse("Transfer-Encoding: chunked\r\n").unwrap().unwrap().transfer_encoding);
    }

    #[test]
    fn bad_upgrade_says_why() {
        let head = UPGRADE.replace("13", "8");
        let (head, _) = parse_head(head.as_bytes(), 8192, 32).unwrap().unwrap();
        assert!(head.websocket_key.is_none());
        assert!(head.upgrade_problem.unwrap().contains("Version"));
        assert_eq!(parse_head(b"\x16\x03\x01garbage\r\n\r\n", 8192, 32), Err(HeadError::Malformed));
    }
}
