fn main() {
    std::process::exit(codex_host::cli::main());
}
