use std::process::ExitCode;

fn main() -> ExitCode {
    limit_malloc_arenas();
    regmirror::cli::run(regmirror::cli::Cli::parse_args())
}

/// glibc gives every thread that allocates its own arena, and freed 1 MiB blob chunks linger in
/// each: with many blocking-pool threads that doubles peak memory for nothing. Two arenas keep
/// fan-out memory flat at no measured cost in throughput.
///
/// Blob buffers (up to 1 MiB) come and go at the rate bytes flow. glibc would map the large ones
/// afresh and hand them back to the kernel on free, and trim its heaps as soon as they shrink:
/// every megabyte streamed would then fault in new pages, which costs more than the copy itself
/// (and far more on VMs that back guest memory lazily). So buffers up to 2 MiB come from the heap,
/// and up to 16 MiB of freed heap stays for reuse: a cold 256 MiB pull takes no page faults
/// instead of ~17,000.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}
