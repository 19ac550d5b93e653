//! The runtime tests' logging binary: what `nodelet log-driver` does, without depending on how
//! the agent's main wires its subcommands.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = nodelet::runtime::logdriver::run_log_driver(&args) {
        eprintln!("{e}");
        std::process::exit(2);
    }
}
