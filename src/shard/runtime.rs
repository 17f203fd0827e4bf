//! What a shard runs on: its cores, its listening sockets, and its compio runtime (io_uring
//! tuned for one thread, a plain ring, or epoll).

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;

use compio::driver::{DriverType, ProactorBuilder};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Driver;

/// The cores this process may run on (a `taskset` or cgroup may allow fewer than exist).
pub(super) fn allowed_cores() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills a cpu_set_t we own; CPU_ISSET reads it.
    let cores: Vec<usize> = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            Vec::new()
        } else {
            (0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect()
        }
    };
    if cores.is_empty() {
        (0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).collect()
    } else {
        cores
    }
}

/// One listener per shard on the same address (`SO_REUSEPORT`), so the kernel spreads
/// connections. Port 0 is resolved by the first bind and reused by the rest.
pub(super) fn bind_listeners(addr: SocketAddr, shards: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    let mut listeners = Vec::with_capacity(shards);
    for _ in 0..shards {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// The ways to build a shard's runtime, best first. A shard's ring is only ever used by its
/// own thread, which lets io_uring skip cross-thread synchronisation (single issuer) and run
/// completion work when the shard asks for it (deferred task running): about half the CPU
/// per operation here. Kernels without those flags get a plain ring; no ring at all, epoll.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum RuntimeKind {
    TunedUring,
    PlainUring,
    Epoll,
}

fn runtime_kinds(driver: Driver) -> &'static [RuntimeKind] {
    match driver {
        Driver::Auto => &[RuntimeKind::TunedUring, RuntimeKind::PlainUring, RuntimeKind::Epoll],
        Driver::IoUring => &[RuntimeKind::TunedUring, RuntimeKind::PlainUring],
        Driver::Epoll => &[RuntimeKind::Epoll],
    }
}

fn build_runtime(kind: RuntimeKind, core: Option<usize>) -> io::Result<compio::runtime::Runtime> {
    let mut proactor = ProactorBuilder::new();
    match kind {
        RuntimeKind::TunedUring => {
            proactor
                .driver_type(DriverType::IoUring)
                .single_issuer(true)
                .coop_taskrun(true)
                .taskrun_flag(true)
                .defer_taskrun(true);
        }
        RuntimeKind::PlainUring => {
            proactor.driver_type(DriverType::IoUring);
        }
        RuntimeKind::Epoll => {
            proactor.driver_type(DriverType::Poll);
        }
    }
    let mut builder = compio::runtime::RuntimeBuilder::new();
    builder.with_proactor(proactor);
    if let Some(core) = core {
        builder.thread_affinity(HashSet::from([core]));
    }
    builder.build()
}

/// The first runtime that builds, logging each that does not.
pub(super) fn first_runtime(
    id: usize,
    driver: Driver,
    core: Option<usize>,
) -> io::Result<(compio::runtime::Runtime, RuntimeKind)> {
    let mut last = io::Error::other("no runtime kind to try");
    for &kind in runtime_kinds(driver) {
        match build_runtime(kind, core) {
            Ok(runtime) => return Ok((runtime, kind)),
            Err(err) => {
                tracing::warn!(shard = id, ?kind, error = %err, "runtime unavailable; trying the next");
                last = err;
            }
        }
    }
    Err(last)
}
