//! `custos bench`: figures for ingest, reads, searches and sealing cost.
//! (Being written; see `run`.)

/// Benchmark options.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A short smoke run (small data sets, a few seconds) for CI.
    #[arg(long)]
    pub quick: bool,
}

/// Run the benchmark and print its figures.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("the benchmark is not built yet")
}
