//! The process's own figures from `/proc` (Linux): memory, descriptors, CPU time.

/// What `/proc/self` says; `None` where it could not be read.
#[derive(Debug, Default)]
pub struct ProcessFigures {
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub threads: Option<u64>,
}

pub fn read() -> ProcessFigures {
    // SAFETY: sysconf only reads a system constant.
    let (page_size, ticks) = unsafe { (libc::sysconf(libc::_SC_PAGESIZE), libc::sysconf(libc::_SC_CLK_TCK)) };
    let statm = std::fs::read_to_string("/proc/self/statm").ok();
    let mut pages = statm.as_deref().unwrap_or("").split_whitespace().map(|n| n.parse::<u64>().ok());
    let virtual_pages = pages.next().flatten();
    let resident_pages = pages.next().flatten();
    let page_size = u64::try_from(page_size).unwrap_or(4096);
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the command name (which may hold spaces), counted from field 3 (state).
    let after_name = stat.as_deref().and_then(|s| s.rsplit_once(')')).map(|(_, rest)| rest);
    let fields: Vec<&str> = after_name.map(|rest| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let cpu_ticks = field(14).zip(field(15)).map(|(user, system)| user + system);
    let cpu_seconds = cpu_ticks.filter(|_| ticks > 0).map(|t| t as f64 / ticks as f64);
    let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|dir| dir.count() as u64);
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct we own.
    let max_fds = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit.rlim_cur);
    ProcessFigures {
        resident_bytes: resident_pages.map(|p| p * page_size),
        virtual_bytes: virtual_pages.map(|p| p * page_size),
        open_fds,
        max_fds,
        cpu_seconds,
        threads: field(20),
    }
}
