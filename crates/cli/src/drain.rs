//! `splitserve drain`: asks a proxy to drain a decode instance, or to put it back.

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct DrainArgs {
    /// The proxy's admin URL (its --admin-port)
    #[arg(long, value_name = "URL")]
    pub proxy_admin: String,
    /// The instance to drain: its URL in the proxy's --decode
    #[arg(long, value_name = "URL")]
    pub decode: String,
    /// Put the instance back into rotation instead
    #[arg(long)]
    pub undo: bool,
}

/// `splitserve drain`: asks the proxy to drain a decode instance and prints its report.
pub fn drain(a: DrainArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let path = if a.undo { "undrain" } else { "drain" };
        let url = format!("{}/admin/{path}", a.proxy_admin.trim_end_matches('/'));
        // An admin listener off loopback wants the fleet's token ($SPLITSERVE_ADMIN_TOKEN).
        let r = splitserve_server::http::with_admin_token(reqwest::Client::new().post(&url))
            .json(&serde_json::json!({ "decode": a.decode }))
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = r.status();
        let v: serde_json::Value = r.json().await.context("reading the proxy's answer")?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        anyhow::ensure!(status.is_success(), "{path} failed ({status})");
        Ok(())
    })
}
