fn main() -> std::process::ExitCode {
    bk_core::cli::main(bk_restore::run)
}
