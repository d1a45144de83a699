fn main() -> std::process::ExitCode {
    bk_core::prune::main()
}
