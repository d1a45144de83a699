fn main() -> std::process::ExitCode {
    bk_stores::main(bk_restore::run)
}
