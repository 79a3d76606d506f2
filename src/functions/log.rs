//! `log` functions: one structured log line per event (target `pgfire::function`).

use futures_util::future::BoxFuture;

use super::{Delivery, FunctionError, Kind};
use crate::catalog::FunctionDef;

pub struct Log;

impl Log {
    /// Write the line (when `pgfire::function` logs at INFO): a log run never waits.
    pub fn write(&self, def: &FunctionDef, d: &Delivery<'_>) -> Result<(), FunctionError> {
        if tracing::enabled!(target: "pgfire::function", tracing::Level::INFO) {
            let envelope = String::from_utf8_lossy(d.envelope());
            tracing::info!(target: "pgfire::function", function = %def.name, event_id = %d.event.id,
                event_type = %d.event.event_type, envelope = %envelope, "event");
        }
        Ok(())
    }
}

impl Kind for Log {
    fn post<'a>(
        &'a self,
        def: &'a FunctionDef,
        d: &'a Delivery<'a>,
    ) -> BoxFuture<'a, Result<(), FunctionError>> {
        Box::pin(async move { self.write(def, d) })
    }
}
