//! The `streamboot` binary: see `streamboot --help`.

fn main() {
    std::process::exit(streamboot::cli::main());
}
