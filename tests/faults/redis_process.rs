//! A real `redis-server` that a fault can kill and bring back: empty, from its last snapshot
//! (RDB, as Redis does by default; or a replica that was behind), or from its append-only file.

use std::path::PathBuf;

use crate::common::{redis_command, RedisServer};

/// How Redis keeps its data on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Snapshots only when told (`SAVE`), as a periodic RDB would take them.
    Snapshots,
    /// Every write in the append-only file before it is answered (`appendfsync always`).
    AppendOnly,
}

pub struct Redis {
    server: Option<RedisServer>,
    pub port: u16,
    dir: tempfile::TempDir,
    persistence: Persistence,
}

impl Redis {
    pub fn start(persistence: Persistence) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().expect("a directory for Redis");
        let mut redis = Redis { server: None, port, dir, persistence };
        redis.launch();
        redis
    }

    fn launch(&mut self) {
        let dir = self.dir.path().to_str().unwrap().to_owned();
        let aof = if self.persistence == Persistence::AppendOnly { "yes" } else { "no" };
        let args =
            ["--dir", &dir, "--dbfilename", "dump.rdb", "--save", "", "--appendonly", aof, "--appendfsync", "always"];
        self.server = Some(RedisServer::start_with(self.port, &args));
    }

    pub fn command(&self, args: &[&[u8]]) -> String {
        redis_command(self.port, args)
    }

    /// Writes a snapshot now; a later `restart_from_disk` (without AOF) comes back to it.
    pub fn snapshot(&self) {
        assert_eq!(self.command(&[b"SAVE"]), "+OK");
    }

    /// Kills Redis (SIGKILL: nothing saved on the way out) and starts it again on the same
    /// port from what it has on disk: its last snapshot, or its append-only file.
    pub fn restart_from_disk(&mut self) {
        self.kill();
        self.launch();
    }

    /// Kills Redis and starts it again with nothing on disk.
    pub fn restart_empty(&mut self) {
        self.kill();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let path: PathBuf = entry.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
        self.launch();
    }

    fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }
}
