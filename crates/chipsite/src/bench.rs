//! The benchmark lands in a later step.

#[derive(clap::Args, Debug)]
pub struct Args {}

pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("the benchmark is not built yet")
}
