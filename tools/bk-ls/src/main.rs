fn main() -> std::process::ExitCode {
    bk_core::ls::main()
}
