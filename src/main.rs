//! The `pgfire` command.

/// mimalloc: the dispatch path allocates many small, short-lived values (rows, events, history
/// records); glibc's allocator was a tenth of the CPU in the CDC benchmark.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // No transparent huge pages: with THP on (`always`, Debian's default), each first touch of
    // memory zeroes 2 MB at once, also of memory pgfire never uses. After a big commit that was
    // a third of the CPU spent before the transaction was settled, and peak RSS ~25% higher.
    // Best effort: a kernel without the setting just keeps its default.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    pgfire::cli::main()
}
