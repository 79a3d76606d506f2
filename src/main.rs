//! The `pgfire` command.

fn main() -> std::process::ExitCode {
    pgfire::cli::main()
}
