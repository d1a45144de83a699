fn main() -> std::process::ExitCode {
    bk_ship::main()
}
