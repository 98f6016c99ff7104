//! The store's conformance suite against a real PostgreSQL and SQLite in the same run.

use anyhow::Result;
use isthmus_core::store::{Backend, Store, conformance};
use isthmus_tests::Postgres;

#[tokio::test]
async fn store_conformance_on_postgres_and_sqlite() -> Result<()> {
    let pg = Postgres::start().await?;
    let store = Store::connect(&pg.url(), 4).await?;
    assert_eq!(store.backend(), Backend::Postgres);
    conformance::run_all(&store).await;

    let dir = tempfile::tempdir()?;
    let store = Store::connect(&format!("sqlite://{}", dir.path().join("t.db").display()), 4).await?;
    assert_eq!(store.backend(), Backend::Sqlite);
    conformance::run_all(&store).await;
    Ok(())
}
