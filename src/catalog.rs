//! TODO
pub async fn events_cmd(_url: &str) -> anyhow::Result<()> { anyhow::bail!("not yet") }
