fn main() -> std::process::ExitCode {
    bk_engines::verify::main()
}
