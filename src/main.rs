//! The `pgfire` command.

/// mimalloc: the dispatch path allocates many small, short-lived values (rows, events, history
/// records); glibc's allocator was a tenth of the CPU in the CDC benchmark.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    pgfire::cli::main()
}
