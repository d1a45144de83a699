fn main() -> std::process::ExitCode {
    bk_engines::dump::main()
}
