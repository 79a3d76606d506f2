//! TODO
pub async fn run_cmd(_url: &str, _s: crate::cli::ServiceArgs) -> anyhow::Result<()> { anyhow::bail!("not yet") }
pub async fn dev_cmd(_d: std::path::PathBuf, _p: u16, _s: crate::cli::ServiceArgs) -> anyhow::Result<()> { anyhow::bail!("not yet") }
pub async fn status_cmd(_url: &str) -> anyhow::Result<()> { anyhow::bail!("not yet") }
