//! What a reload (SIGHUP) changes, sans I/O: the settings that differ between the running
//! configuration and one loaded again, which of them take effect without a restart, and the
//! configuration to put in force: the loaded file's reloadable settings over the running
//! values of everything else.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Config, ConfigError};

/// Settings a reload applies: a dotted name, or a whole section. Every other setting needs a
/// restart (a new setting too, until it is listed here), because something built at start
/// holds it: listeners, shard threads, inboxes, the broker, channel tables and their history
/// policy, the token verifier, compression shared between connections, the log format.
pub const RELOADABLE: &[&str] = &[
    "log_level",
    "shutdown_timeout",
    "limits.max_message_size",
    "limits.max_frames_per_message",
    "limits.max_subscriptions_per_connection",
    "limits.max_connections",
    "limits.max_connections_per_shard",
    "limits.max_connections_per_ip",
    "limits.max_request_header_bytes",
    "limits.max_request_headers",
    "limits.handshake_timeout",
    "limits.connect_timeout",
    "limits.max_channel_length",
    "limits.max_payload_size",
    "delivery.batch_size",
    "delivery.priority_types",
    "delivery.conflate_above_bytes",
    "acks.timeout",
    "acks.max_redeliveries",
    "acks.max_unacked",
    "auth.refresh_reminder",
    "auth.expiry_grace",
    "rate_limits",
    "heartbeat",
    "cleanup.interval",
    "api.keys",
    "api.max_body_bytes",
    "api.max_batch_publications",
];

/// Settings whose values never appear in a log line.
const SECRET: &[&str] = &["auth.hmac_secret", "api.keys"];

/// One setting that differs, with its values as a log line shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Dotted name, e.g. `limits.max_message_size`.
    pub setting: String,
    pub old: String,
    pub new: String,
}

/// The outcome of comparing the running configuration with one loaded again.
#[derive(Debug, Clone)]
pub struct Reload {
    /// What to put in force: reloadable settings from the loaded file, the rest as running.
    pub config: Config,
    /// Settings that changed and are applied.
    pub applied: Vec<Change>,
    /// Settings that changed but need a restart; not applied.
    pub needs_restart: Vec<Change>,
}

impl Reload {
    /// Compares `running` with `loaded` (both validated). Refused when the settings it would
    /// apply do not fit the running values of those that need a restart (e.g. a larger
    /// `delivery.conflate_above_bytes` together with a larger `limits.max_outbox_bytes`).
    pub fn plan(running: &Config, loaded: &Config) -> Result<Reload, ConfigError> {
        let old = to_value(running);
        let new = to_value(loaded);
        let (mut old_leaves, mut new_leaves) = (BTreeMap::new(), BTreeMap::new());
        flatten(&old, String::new(), &mut old_leaves);
        flatten(&new, String::new(), &mut new_leaves);
        let mut merged = old.clone();
        let (mut applied, mut needs_restart) = (Vec::new(), Vec::new());
        for (setting, &new_value) in &new_leaves {
            let old_value = old_leaves.get(setting).copied().unwrap_or(&Value::Null);
            if old_value == new_value {
                continue;
            }
            let change =
                Change { old: show(setting, old_value), new: show(setting, new_value), setting: setting.clone() };
            if is_reloadable(setting) {
                set(&mut merged, setting, new_value.clone());
                applied.push(change);
            } else {
                needs_restart.push(change);
            }
        }
        let config: Config = serde_json::from_value(merged)
            .map_err(|err| ConfigError::Invalid { setting: "reload", reason: err.to_string() })?;
        config.validate().map_err(|err| ConfigError::WithRunning(Box::new(err)))?;
        Ok(Reload { config, applied, needs_restart })
    }
}

/// Whether `setting` (a dotted leaf name) takes effect without a restart.
pub fn is_reloadable(setting: &str) -> bool {
    RELOADABLE
        .iter()
        .any(|entry| setting == *entry || setting.strip_prefix(entry).is_some_and(|rest| rest.starts_with('.')))
}

fn to_value(config: &Config) -> Value {
    // Every field is a plain value, map or list: rendering cannot fail.
    serde_json::to_value(config).expect("a Config renders as JSON")
}

/// Every setting as a dotted name: tables are walked, anything else (lists included) is one
/// setting.
fn flatten<'a>(value: &'a Value, prefix: String, out: &mut BTreeMap<String, &'a Value>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                flatten(child, name, out);
            }
        }
        _ => {
            out.insert(prefix, value);
        }
    }
}

fn set(root: &mut Value, setting: &str, value: Value) {
    let mut node = root;
    for key in setting.split('.') {
        node = &mut node[key];
    }
    *node = value;
}

fn show(setting: &str, value: &Value) -> String {
    if SECRET.contains(&setting) {
        return "(hidden)".to_owned();
    }
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Bucket;

    fn names(changes: &[Change]) -> Vec<&str> {
        changes.iter().map(|c| c.setting.as_str()).collect()
    }

    #[test]
    fn nothing_changed_is_an_empty_reload() {
        let running = Config::default();
        let reload = Reload::plan(&running, &running.clone()).unwrap();
        assert!(reload.applied.is_empty() && reload.needs_restart.is_empty());
        assert_eq!(reload.config, running);
    }

    #[test]
    fn reloadable_settings_are_applied_with_old_and_new_values() {
        let running = Config::default();
        let mut loaded = running.clone();
        loaded.limits.max_message_size = 40_000;
        loaded.heartbeat.interval = Duration::from_secs(5);
        loaded.rate_limits.user_commands = Bucket::new(10, 60, 2);
        loaded.log_level = "debug".into();
        loaded.validate().unwrap();
        let reload = Reload::plan(&running, &loaded).unwrap();
        assert_eq!(
            names(&reload.applied),
            [
                "heartbeat.interval",
                "limits.max_message_size",
                "log_level",
                "rate_limits.user_commands.burst",
                "rate_limits.user_commands.requests"
            ]
        );
        let size = reload.applied.iter().find(|c| c.setting == "limits.max_message_size").unwrap();
        assert_eq!((size.old.as_str(), size.new.as_str()), ("65536", "40000"));
        let interval = reload.applied.iter().find(|c| c.setting == "heartbeat.interval").unwrap();
        assert_eq!((interval.old.as_str(), interval.new.as_str()), ("15s", "5s"));
        assert!(reload.needs_restart.is_empty());
        assert_eq!(reload.config, loaded);
    }

    #[test]
    fn settings_that_need_a_restart_are_reported_and_kept() {
        let running = Config::default();
        let mut loaded = running.clone();
        loaded.listen = "127.0.0.1:4000".parse().unwrap();
        loaded.shards = 3;
        loaded.broker = "redis://127.0.0.1:6379/0".into();
        loaded.delivery.priority_types = vec!["ROUTE".into()];
        loaded.history.size = 10;
        let reload = Reload::plan(&running, &loaded).unwrap();
        assert_eq!(names(&reload.applied), ["delivery.priority_types"]);
        assert_eq!(reload.applied[0].new, r#"["ROUTE"]"#);
        assert_eq!(names(&reload.needs_restart), ["broker", "history.size", "listen", "shards"]);
        assert_eq!(reload.config.listen, running.listen);
        assert_eq!(reload.config.shards, running.shards);
        assert_eq!(reload.config.broker, running.broker);
        assert_eq!(reload.config.history, running.history);
        assert_eq!(reload.config.delivery.priority_types, ["ROUTE"]);
    }

    #[test]
    fn a_secret_is_never_shown() {
        let running = Config::default();
        let mut loaded = running.clone();
        loaded.auth.hmac_secret = "a-new-secret-that-is-long-enough-0123456789".into();
        let reload = Reload::plan(&running, &loaded).unwrap();
        assert_eq!(names(&reload.needs_restart), ["auth.hmac_secret"]);
        assert_eq!(reload.needs_restart[0].new, "(hidden)");
        assert_eq!(reload.needs_restart[0].old, "(hidden)");
    }

    #[test]
    fn applied_settings_must_fit_the_running_ones_that_need_a_restart() {
        let running = Config::default();
        let mut loaded = running.clone();
        // Valid together, but the outbox size needs a restart: the running 1 MiB stays, and
        // 2 MiB of conflation threshold does not fit it.
        loaded.limits.max_outbox_bytes = 4 * 1024 * 1024;
        loaded.delivery.conflate_above_bytes = 2 * 1024 * 1024;
        loaded.validate().unwrap();
        let err = Reload::plan(&running, &loaded).unwrap_err().to_string();
        assert!(err.contains("delivery.conflate_above_bytes"), "{err}");
        assert!(err.contains("restart"), "{err}");
    }

    #[test]
    fn every_reloadable_name_is_a_setting() {
        let value = to_value(&Config::default());
        let mut leaves = BTreeMap::new();
        flatten(&value, String::new(), &mut leaves);
        for entry in RELOADABLE {
            assert!(leaves.keys().any(|setting| is_reloadable(setting) && setting.starts_with(entry)), "{entry}");
        }
        assert!(!is_reloadable("limits.max_outbox_bytes"));
        assert!(!is_reloadable("heartbeats"), "a section prefix matches whole names only");
        assert!(is_reloadable("rate_limits.connection_attempts_per_ip.window"));
    }
}
