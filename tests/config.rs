//! The command line and configuration layers: file, environment, flags, and refusals.

mod common;

use std::process::Command;

use common::{TestServer, BIN};

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("routopia-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_config_prints_the_effective_config() {
    let path = write_config("good.toml", "shards = 3\n[delivery]\nbatch_size = 64\n");
    let secret = "a-secret-long-enough-for-hs256-0123456789";
    let output = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .env("ROUTOPIA_LIMITS__MAX_CHANNEL_LENGTH", "99")
        .env("ROUTOPIA_AUTH__HMAC_SECRET", secret)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("shards = 3"), "{text}");
    assert!(text.contains("batch_size = 64"), "{text}");
    assert!(text.contains("max_channel_length = 99"), "environment applies: {text}");
    assert!(text.contains("listen = \"0.0.0.0:3000\""), "defaults fill the rest: {text}");
    assert!(text.contains("shutdown_timeout = \"10s\""), "{text}");
    assert!(!text.contains(secret), "the secret is never printed: {text}");
    assert!(text.contains("hmac_secret = \"(set, hidden)\""), "{text}");
}

#[test]
fn check_config_refuses_bad_files_naming_the_setting() {
    let cases = [
        ("zero-batch.toml", "[delivery]\nbatch_size = 0\n", "delivery.batch_size"),
        ("typo.toml", "[limits]\nmax_mesage_size = 10\n", "max_mesage_size"),
        ("wrong-type.toml", "shards = \"many\"\n", "shards"),
        ("bad-driver.toml", "driver = \"kqueue\"\n", "driver"),
        ("no-drain.toml", "shutdown_timeout = \"0s\"\n", "shutdown_timeout"),
        ("bad-syntax.toml", "shards = = 2\n", "good.toml"),
    ];
    for (name, text, expected) in cases {
        let path = write_config(name, text);
        let output = Command::new(BIN).arg("check-config").arg(&path).output().unwrap();
        assert!(!output.status.success(), "{name} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let expected = if expected == "good.toml" { name } else { expected };
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
}

#[test]
fn serve_refuses_a_bad_setting_before_starting() {
    let output = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("ROUTOPIA_LIMITS__MAX_MESSAGE_SIZE", "12")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("limits.max_message_size"), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing started: {}", String::from_utf8_lossy(&output.stdout));
}

#[test]
fn flags_win_over_environment_and_environment_over_file() {
    // TestServer passes --shards 2; the environment says 4.
    let server = TestServer::start(2, &[("ROUTOPIA_SHARDS", "4")]);
    assert_eq!(server.health()["shards"], 2, "the flag beats the environment");
    let path = write_config("shards.toml", "shards = 3\n");
    let output = Command::new(BIN).arg("check-config").arg(&path).env("ROUTOPIA_SHARDS", "4").output().unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("shards = 4"), "the environment beats the file: {text}");
}
