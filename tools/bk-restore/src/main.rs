fn main() -> std::process::ExitCode {
    bk_engines::restore::main()
}
