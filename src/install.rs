//! TODO
pub async fn install_cmd(_url: &str, _slot: &str) -> anyhow::Result<()> { anyhow::bail!("not yet") }
pub async fn uninstall_cmd(_url: &str, _yes: bool) -> anyhow::Result<()> { anyhow::bail!("not yet") }
