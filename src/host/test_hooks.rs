//! Test hooks: ways for the integration tests to make a thread misbehave on purpose, so
//! they can prove through the real binary that a panic or a forbidden syscall ends the VM
//! properly. Compiled only with the `test-hooks` feature (`make test` builds with it); a
//! default build has neither the code nor the environment variables.

/// Set to `event-loop` or `vcpu` to make that thread panic as it starts running the guest.
pub const PANIC_ENV: &str = "MICROVM_TEST_PANIC";

/// Set to `event-loop` or `vcpu` to make that thread attempt a forbidden syscall
/// (`socket(AF_INET, ...)`) right after its seccomp filter is installed (or would have
/// been, with `--no-seccomp`).
pub const SECCOMP_VIOLATION_ENV: &str = "MICROVM_TEST_SECCOMP_VIOLATION";

/// Panics if [`PANIC_ENV`] names `thread`.
pub fn panic_if_asked(thread: &str) {
    if std::env::var_os(PANIC_ENV).is_some_and(|v| v == thread) {
        panic!("{PANIC_ENV}={thread} asked for a panic");
    }
}

/// When [`SECCOMP_VIOLATION_ENV`] names `thread`, attempts `socket(AF_INET, SOCK_STREAM)`,
/// which no filter allows. Without a filter the socket is made and closed and nothing else
/// happens.
pub fn violate_seccomp_if_asked(thread: &str) {
    if std::env::var_os(SECCOMP_VIOLATION_ENV).is_some_and(|v| v == thread) {
        // SAFETY: socket(2) with constant arguments; the result is checked and closed.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd >= 0 {
            // SAFETY: `fd` is the socket just created and owned here.
            unsafe { libc::close(fd) };
        }
    }
}
