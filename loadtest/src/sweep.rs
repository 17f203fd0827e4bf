//! Sweep (in progress).
#[derive(clap::Args, Debug)]
pub struct SweepArgs {}
pub fn run(_args: &SweepArgs) -> Result<(), String> {
    Err("not yet".into())
}
