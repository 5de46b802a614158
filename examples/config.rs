//! `config::ConfigWatch` on the embedded default: an app reloads its feature flags live while
//! an "operator" task edits them, including one invalid edit that is rejected (the last good
//! flags stay in force) and a burst of edits.
//!
//! Run: `cargo run --release --example config`
//! Against a cluster: `DCOORD_ENDPOINTS=127.0.0.1:9081,... cargo run --release --example config`

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use dcoord::config::{ConfigEvent, ConfigOptions, ConfigWatch, Source};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Flags {
    dark_mode: bool,
    checkout_v2: bool,
    max_cart_items: u32,
}

fn validate(f: &Flags) -> Result<(), String> {
    if f.max_cart_items == 0 || f.max_cart_items > 500 {
        return Err(format!(
            "max_cart_items must be 1..=500, got {}",
            f.max_cart_items
        ));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> dcoord::Result<()> {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, _node) = common::store(dir.path()).await?;
    let key = format!("/example/{}/flags.json", uuid::Uuid::new_v4().simple());
    let defaults = Flags {
        dark_mode: false,
        checkout_v2: false,
        max_cart_items: 50,
    };
    let flags = ConfigWatch::open(
        store.clone(),
        Source::key(key.clone()),
        ConfigOptions::default()
            .default_value(defaults)
            .validate(validate),
    )
    .await?;
    let mut rx = flags.wait_configured().await?;
    println!("app starts with {:?}", *rx.borrow_and_update());

    // The app: reacts to every event.
    let mut events = Box::pin(flags.events());
    let app = tokio::spawn(async move {
        while let Some(Ok(ev)) = events.next().await {
            match ev {
                ConfigEvent::Applied { new, revision, .. } => {
                    println!("  app reloaded (revision {revision}): {new:?}")
                }
                ConfigEvent::Rejected { key, error, .. } => {
                    println!("  app refused a bad edit of {key}: {error}")
                }
                ConfigEvent::Missing { .. } => println!("  flags deleted: defaults apply"),
            }
        }
    });

    // The operator.
    println!("operator: turn on dark mode");
    flags.update(|f| f.dark_mode = true).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    println!("operator: writes max_cart_items = 0 straight into the store (invalid)");
    store
        .put(
            key.as_bytes(),
            br#"{"dark_mode":true,"checkout_v2":true,"max_cart_items":0}"#,
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    println!(
        "app still runs with {:?}",
        *flags.current().expect("configured")
    );
    println!("operator: the same edit through update() is refused before writing:");
    if let Err(e) = flags.update(|f| f.max_cart_items = 0).await {
        println!("  {e}");
    }
    println!("operator: fixes it");
    flags
        .publish(&Flags {
            dark_mode: true,
            checkout_v2: true,
            max_cart_items: 120,
        })
        .await?;
    rx.wait_for(|f| f.max_cart_items == 120)
        .await
        .expect("applied");
    tokio::time::sleep(Duration::from_millis(100)).await;
    println!("final flags: {:?}", *flags.current().expect("configured"));
    app.abort();
    Ok(())
}
