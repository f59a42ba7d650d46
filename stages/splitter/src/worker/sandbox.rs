//! The render worker's seal: what a PDF that takes over pdfium can reach.
//!
//! The splitter starts the worker with an empty environment (only
//! [`KEPT_ENV`]), its stderr on a pipe, and three arguments the worker
//! applies to itself before it reads a request:
//! - it dies with the splitter (`PR_SET_PDEATHSIG` = `SIGKILL`, and exits at
//!   once when the splitter is already gone);
//! - resource limits: address space (`splitter.render_memory_mb`), at most
//!   [`MAX_OPEN_FILES`] open files, no file written past 0 bytes
//!   (`RLIMIT_FSIZE`), no core dumps;
//! - after pdfium is bound, a Landlock ruleset (Linux 5.13+, best effort:
//!   [`seal`] says what the kernel enforced): no file written, created,
//!   removed, truncated or executed anywhere; files read only under the
//!   library's directory, the splitter's temporary directory (where the PDF
//!   is) and the font directories; no TCP bind or connect; no abstract unix
//!   socket and no signal or ptrace (`/proc/<pid>/environ`, `mem`) outside
//!   the worker;
//! - a seccomp filter (every Linux kernel this runs on): `socket`,
//!   `socketpair`, `execve`, `ptrace`, `process_vm_*`, `bpf`, `io_uring_*`,
//!   namespaces, mounts, keyrings, module loading fail with `EPERM`.
//!
//! pdfium only reads its library, fonts and the PDF, and writes frames to
//! stdout: rendering is unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The only variables a worker keeps from the splitter's environment
/// (which holds the NATS password, S3 keys, API tokens, webhook secret).
pub const KEPT_ENV: &[&str] = &["LD_LIBRARY_PATH", "RUST_BACKTRACE", super::FAULT_ENV];

/// `RLIMIT_NOFILE` of the worker: stdio, the PDF, a font file or directory
/// being read, and room to spare.
pub const MAX_OPEN_FILES: u64 = 64;

/// Where pdfium (Linux build) looks for system fonts.
const FONT_DIRS: &[&str] = &["/usr/share/fonts", "/usr/share/X11/fonts", "/usr/local/share/fonts"];

/// Dies with the splitter: `SIGKILL` when the parent exits; exits now (with
/// `false`) when `parent` (the splitter's pid) is gone already.
pub fn die_with_parent(parent: Option<u32>) -> bool {
    use rustix::process::{getppid, set_parent_process_death_signal, Signal};
    if let Err(e) = set_parent_process_death_signal(Some(Signal::KILL)) {
        eprintln!("render-worker: cannot set the parent-death signal: {e}");
    }
    let now = getppid().map(|p| p.as_raw_nonzero().get() as u32);
    parent.is_none_or(|p| now == Some(p))
}

/// Applies the resource limits; returns what failed (empty: all applied).
pub fn limit_resources(memory_bytes: u64) -> Vec<String> {
    use rlimit::Resource;
    let mut limits = vec![(Resource::NOFILE, MAX_OPEN_FILES), (Resource::FSIZE, 0), (Resource::CORE, 0)];
    if memory_bytes > 0 {
        limits.push((Resource::AS, memory_bytes));
    }
    limits
        .into_iter()
        .filter_map(|(resource, limit)| {
            rlimit::setrlimit(resource, limit, limit).err().map(|e| format!("{}={limit}: {e}", resource.as_name()))
        })
        .collect()
}

/// Landlock, then seccomp; returns a one-line description of what holds
/// (logged by the splitter).
pub fn seal(readable: &[PathBuf]) -> String {
    let landlock = match landlock(readable) {
        Ok(status) => status,
        Err(e) => format!("landlock failed: {e}"),
    };
    let seccomp = match seccomp() {
        Ok(()) => "seccomp: on".to_string(),
        Err(e) => format!("seccomp failed: {e}"),
    };
    format!("{landlock}; {seccomp}")
}

fn landlock(readable: &[PathBuf]) -> Result<String, landlock::RulesetError> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
        Scope, ABI,
    };
    let abi = ABI::V6;
    let dirs: Vec<&Path> =
        readable.iter().map(PathBuf::as_path).chain(FONT_DIRS.iter().map(Path::new)).filter(|p| p.exists()).collect();
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)?
        .create()?
        .add_rules(path_beneath_rules(dirs, AccessFs::from_read(abi)))?
        .restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "landlock: fully enforced".to_string(),
        RulesetStatus::PartiallyEnforced => "landlock: partially enforced (older kernel)".to_string(),
        RulesetStatus::NotEnforced => "landlock: NOT enforced (kernel without Landlock)".to_string(),
    })
}

/// System calls the worker never needs; each fails with `EPERM`.
fn denied_syscalls() -> Vec<i64> {
    let mut calls = vec![
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_reboot,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([libc::SYS_fork, libc::SYS_vfork]);
    calls
}

fn seccomp() -> Result<(), seccompiler::Error> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        denied_syscalls().into_iter().map(|nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)?;
    let program: BpfProgram = filter.try_into()?;
    seccompiler::apply_filter(&program)
}
