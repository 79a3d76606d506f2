//! `sql` functions: `SELECT fn($1::jsonb)` on a pooled connection to the served database.

use futures_util::future::BoxFuture;

use super::{Delivery, FunctionError, Kind};
use crate::catalog::FunctionDef;

pub struct Sql {
    pool: deadpool_postgres::Pool,
}

impl Sql {
    pub fn new(database_url: &str) -> anyhow::Result<Sql> {
        let mut config: tokio_postgres::Config = database_url.parse()?;
        config.application_name("pgfire function");
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(4)
            .build()?;
        Ok(Sql { pool })
    }
}

impl Kind for Sql {
    fn post<'a>(
        &'a self,
        def: &'a FunctionDef,
        d: &'a Delivery<'a>,
    ) -> BoxFuture<'a, Result<(), FunctionError>> {
        Box::pin(async move {
            let callable = def.sql_callable.as_deref().ok_or_else(|| {
                FunctionError::Failed(format!(
                    "SQL function {}(jsonb) does not exist",
                    def.target.as_deref().unwrap_or("")
                ))
            })?;
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| FunctionError::Failed(format!("no database connection: {e}")))?;
            let envelope = std::str::from_utf8(d.envelope())
                .map_err(|e| FunctionError::Failed(e.to_string()))?;
            let sql = format!("SELECT {callable}($1::text::jsonb)::text");
            let stmt = client
                .prepare_cached(&sql)
                .await
                .map_err(|e| FunctionError::Failed(crate::db::describe(&e)))?;
            let cancel = client.cancel_token();
            let mut guard = CancelOnDrop(Some(cancel));
            let result = client.query_one(&stmt, &[&envelope]).await;
            guard.0 = None;
            result
                .map(|_| ())
                .map_err(|e| FunctionError::Failed(crate::db::describe(&e)))
        })
    }
}

/// Cancels the running query if the call is dropped (timeout), so it does not hold the connection.
struct CancelOnDrop(Option<tokio_postgres::CancelToken>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.0.take() {
            tokio::spawn(async move {
                let _ = token.cancel_query(tokio_postgres::NoTls).await;
            });
        }
    }
}
