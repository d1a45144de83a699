fn main() -> std::process::ExitCode {
    bk::main(std::env::args_os().collect())
}
