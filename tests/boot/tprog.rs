//! The host program of the `run_*` boot cases: dynamically linked (Rust's std links
//! glibc), prints its arguments and exits with the number in the first one.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    println!("tprog: hello from {} with {:?}", args[0], &args[1..]);
    eprintln!("tprog: stderr too");
    let code = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    std::process::exit(code);
}
