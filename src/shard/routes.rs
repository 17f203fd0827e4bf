//! The one HTTP router (not to be confused with `router.rs`, which routes publications to
//! channel owners). Every request, on whichever listener it came, is looked up in [`TABLE`]:
//! the path names a route and what the path holds (a channel, a client id, a dictionary id),
//! the table says which listeners serve the route and the method it takes. What a route
//! answers is for the code that serves it: the WebSocket upgrade (`conn.rs`), the pages
//! (`http.rs`), the server API (`api/`).

use super::state::Endpoint;

/// Where a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Listener {
    /// The main port (`listen`). `echo`: `testing.echo_endpoint` is on; `api`: the server API
    /// is served here (it has no `api.listen` of its own).
    Main { echo: bool, api: bool },
    /// The server API's own address (`api.listen`).
    Api,
    /// The metrics address (`metrics_listen`).
    Metrics,
}

impl Listener {
    /// The 404 message for a path this listener does not serve.
    pub(super) fn not_found(self) -> &'static str {
        match self {
            Listener::Main { .. } => "no such path; try /ws or /health",
            Listener::Api => "this address serves the API only (/api/…)",
            Listener::Metrics => "this address serves /metrics and /health",
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// A WebSocket upgrade. Its method is the upgrade's to check (400, not 405).
    WebSocket(Endpoint),
    /// A plain HTTP page.
    Page(Page),
    /// A server API route.
    Api(ApiRoute),
    /// Nothing here: 404 with this message.
    NotFound(&'static str),
}

/// The plain HTTP pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Page {
    Health,
    Metrics,
    ConfigLimits,
    /// `/zstd/dictionaries…`: the target is what follows.
    ZstdDictionaries,
}

/// The server API's routes, as metric labels (`realtime_api_requests_total{route}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ApiRoute {
    Publish,
    PublishBatch,
    Channels,
    History,
    Subscriptions,
    Disconnect,
    /// Any other path under `/api`: counted, answered 404 once the key is checked.
    Unknown,
}

impl ApiRoute {
    pub(super) const ALL: [ApiRoute; 7] = [
        ApiRoute::Publish,
        ApiRoute::PublishBatch,
        ApiRoute::Channels,
        ApiRoute::History,
        ApiRoute::Subscriptions,
        ApiRoute::Disconnect,
        ApiRoute::Unknown,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            ApiRoute::Publish => "publish",
            ApiRoute::PublishBatch => "publish_batch",
            ApiRoute::Channels => "channels",
            ApiRoute::History => "history",
            ApiRoute::Subscriptions => "subscriptions",
            ApiRoute::Disconnect => "disconnect",
            ApiRoute::Unknown => "unknown",
        }
    }
}

/// A request's route, the method the route takes (`None`: none is checked here), and what its
/// path holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Matched<'p> {
    pub route: Route,
    pub method: Option<&'static str>,
    pub target: &'p str,
}

/// The paths an entry takes, and which part of them is its target.
#[derive(Clone, Copy)]
enum Path {
    /// This path; no target.
    Exact(&'static str),
    /// Paths that start so; the target is the rest.
    Prefix(&'static str),
    /// Paths that start with the first and end with the second; the target is between.
    Between(&'static str, &'static str),
}

impl Path {
    fn matches(self, path: &str) -> Option<&str> {
        match self {
            Path::Exact(exact) => (path == exact).then_some(""),
            Path::Prefix(prefix) => path.strip_prefix(prefix),
            Path::Between(prefix, suffix) => path.strip_prefix(prefix)?.strip_suffix(suffix),
        }
    }
}

/// The listeners that serve an entry.
#[derive(Clone, Copy)]
enum On {
    Main,
    /// The main port, with `testing.echo_endpoint`.
    MainWithEcho,
    MainAndMetrics,
    /// The API's own address, or the main port when there is none.
    Api,
}

impl On {
    fn serves(self, listener: Listener) -> bool {
        match (self, listener) {
            (On::Main, Listener::Main { .. }) => true,
            (On::MainWithEcho, Listener::Main { echo, .. }) => echo,
            (On::MainAndMetrics, Listener::Main { .. } | Listener::Metrics) => true,
            (On::Api, Listener::Main { api, .. }) => api,
            (On::Api, Listener::Api) => true,
            _ => false,
        }
    }
}

struct Entry {
    path: Path,
    method: Option<&'static str>,
    on: On,
    route: Route,
}

const fn entry(path: Path, method: Option<&'static str>, on: On, route: Route) -> Entry {
    Entry { path, method, on, route }
}

const GET: Option<&str> = Some("GET");
const POST: Option<&str> = Some("POST");

/// Every route. The first entry whose path matches decides: when its listeners do not include
/// the request's, the path is not found there.
const TABLE: [Entry; 14] = {
    use ApiRoute as A;
    use Path::{Between, Exact, Prefix};
    [
        entry(Exact("/ws"), None, On::Main, Route::WebSocket(Endpoint::Protocol)),
        entry(Exact("/echo"), None, On::MainWithEcho, Route::WebSocket(Endpoint::Echo)),
        entry(Exact("/health"), GET, On::MainAndMetrics, Route::Page(Page::Health)),
        entry(Exact("/metrics"), GET, On::MainAndMetrics, Route::Page(Page::Metrics)),
        entry(Exact("/config/limits"), GET, On::Main, Route::Page(Page::ConfigLimits)),
        entry(Prefix("/zstd/dictionaries"), GET, On::Main, Route::Page(Page::ZstdDictionaries)),
        entry(Exact("/api/publish"), POST, On::Api, Route::Api(A::Publish)),
        entry(Exact("/api/publish/batch"), POST, On::Api, Route::Api(A::PublishBatch)),
        entry(Exact("/api/channels"), GET, On::Api, Route::Api(A::Channels)),
        entry(Between("/api/channels/", "/history"), GET, On::Api, Route::Api(A::History)),
        entry(Between("/api/clients/", "/subscriptions"), GET, On::Api, Route::Api(A::Subscriptions)),
        entry(Between("/api/clients/", "/disconnect"), POST, On::Api, Route::Api(A::Disconnect)),
        entry(Exact("/api"), None, On::Api, Route::Api(A::Unknown)),
        entry(Prefix("/api/"), None, On::Api, Route::Api(A::Unknown)),
    ]
};

/// The route of a request for `path` on `listener`.
pub(super) fn route(listener: Listener, path: &str) -> Matched<'_> {
    let not_found = |message| Matched { route: Route::NotFound(message), method: None, target: "" };
    for entry in &TABLE {
        let Some(target) = entry.path.matches(path) else { continue };
        if entry.on.serves(listener) {
            return Matched { route: entry.route, method: entry.method, target };
        }
        return not_found(match (listener, entry.route) {
            (Listener::Main { .. }, Route::Api(_)) => "the server API is served on its own address (api.listen)",
            _ => listener.not_found(),
        });
    }
    not_found(listener.not_found())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: Listener = Listener::Main { echo: false, api: true };

    fn api(path: &str) -> (Route, Option<&'static str>, &str) {
        let Matched { route, method, target } = route(Listener::Api, path);
        (route, method, target)
    }

    #[test]
    fn routes_and_their_targets() {
        assert_eq!(api("/api/publish"), (Route::Api(ApiRoute::Publish), Some("POST"), ""));
        assert_eq!(
            api("/api/channels/user@x/route-1/history"),
            (Route::Api(ApiRoute::History), Some("GET"), "user@x/route-1")
        );
        assert_eq!(api("/api/clients/1-2-3/disconnect"), (Route::Api(ApiRoute::Disconnect), Some("POST"), "1-2-3"));
        assert_eq!(api("/api/clients/1-2-3/subscriptions").0, Route::Api(ApiRoute::Subscriptions));
        assert_eq!(api("/api/nothing").0, Route::Api(ApiRoute::Unknown));
        assert_eq!(api("/api").0, Route::Api(ApiRoute::Unknown));
        assert_eq!(route(MAIN, "/zstd/dictionaries/7").target, "/7");
    }

    #[test]
    fn each_listener_serves_its_own_paths() {
        let not_found = |listener, path| match route(listener, path).route {
            Route::NotFound(message) => message,
            route => panic!("{path} on {listener:?} is {route:?}"),
        };
        assert_eq!(route(MAIN, "/ws").route, Route::WebSocket(Endpoint::Protocol));
        assert_eq!(not_found(MAIN, "/echo"), "no such path; try /ws or /health");
        let echo = Listener::Main { echo: true, api: true };
        assert_eq!(route(echo, "/echo").route, Route::WebSocket(Endpoint::Echo));
        assert_eq!(route(MAIN, "/api/publish").route, Route::Api(ApiRoute::Publish));
        let api_elsewhere = Listener::Main { echo: false, api: false };
        assert!(not_found(api_elsewhere, "/api/publish").contains("api.listen"));
        assert!(not_found(api_elsewhere, "/api").contains("api.listen"));
        assert_eq!(not_found(MAIN, "/apis"), "no such path; try /ws or /health");
        assert_eq!(not_found(Listener::Api, "/health"), "this address serves the API only (/api/…)");
        assert_eq!(route(Listener::Metrics, "/metrics").route, Route::Page(Page::Metrics));
        assert_eq!(route(Listener::Metrics, "/health").method, Some("GET"));
        for path in ["/ws", "/config/limits", "/zstd/dictionaries", "/api/publish"] {
            assert_eq!(not_found(Listener::Metrics, path), "this address serves /metrics and /health");
        }
    }
}
