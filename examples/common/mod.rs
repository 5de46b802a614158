//! What every example starts with: the store to run on.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use dcoord::engine::EmbeddedNode;
use dcoord::store::{RemoteOptions, RemoteStore, Store};

/// A cluster when `--endpoints host:port,...` or `$DCOORD_ENDPOINTS` is given (`dcoord cluster`
/// prints them), else the embedded default: a node with its data in `dir`, which runs as long
/// as the returned handle lives.
pub async fn store(dir: &Path) -> dcoord::Result<(Arc<dyn Store>, Option<EmbeddedNode>)> {
    let args: Vec<String> = std::env::args().collect();
    let endpoints = args
        .iter()
        .position(|a| a == "--endpoints")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var("DCOORD_ENDPOINTS").ok());
    if let Some(eps) = endpoints {
        let eps: Vec<String> = eps.split(',').map(str::to_string).collect();
        println!("connecting to {eps:?}");
        let mut options = RemoteOptions::default();
        // A TLS cluster (`dcoord cluster --tls` prints these): its CA, and a client certificate.
        if let Ok(ca) = std::env::var("DCOORD_CACERT") {
            let mut tls = dcoord::tls::ClientTls::from_ca_file(ca)?;
            if let (Ok(cert), Ok(key)) = (std::env::var("DCOORD_CERT"), std::env::var("DCOORD_KEY"))
            {
                tls = tls.identity_files(cert, key)?;
            }
            options = options.tls(tls);
        }
        let remote = RemoteStore::connect(&eps, options).await?;
        return Ok((Arc::new(remote), None));
    }
    let t = Instant::now();
    let node = EmbeddedNode::start(dir).await?;
    println!(
        "embedded d-engine ready in {:?} at {}",
        t.elapsed(),
        node.endpoint()
    );
    Ok((node.dyn_store(), Some(node)))
}
