fn main() -> std::process::ExitCode {
    bk_stores::main(bk_core::ls::run)
}
