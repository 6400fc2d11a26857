//! `chipsctl`: every site administration command, over AdminService.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = chipsctl::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chipsctl: error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    match runtime.block_on(chipsctl::run(cli, &mut out)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chipsctl: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
