//! zstd table (in progress).
use std::path::Path;
#[derive(clap::Args, Debug)]
pub struct ZstdTableArgs {}
pub fn run(_args: &ZstdTableArgs) -> Result<(), String> {
    Err("not yet".into())
}
pub fn write_samples(_kind: crate::payloads::Kind, _count: usize, _dir: &Path, _seed: u64) -> Result<(), String> {
    Err("not yet".into())
}
