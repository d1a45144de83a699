fn main() -> std::process::ExitCode {
    bk_core::cli::main(bk_ship::run)
}
