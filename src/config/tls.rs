//! TLS for `wss://` (`[tls]`): the certificate and key files.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// TLS for `wss://` (`[tls]`). Both files set: every connection speaks TLS; both empty: plain
/// `ws://` (behind a terminating proxy). Reloaded on SIGHUP; a bad pair keeps the old one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl Tls {
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }

    /// Checks what types alone cannot (whether the files load is checked where they are read);
    /// each refusal names its setting.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.cert_file.as_os_str().is_empty() != self.key_file.as_os_str().is_empty() {
            return Err(invalid("tls", "set both tls.cert_file and tls.key_file, or neither"));
        }
        Ok(())
    }
}
