//! The control API's view of the service.

use super::{Service, ServiceError};

/// The control API's view of the service.
impl crate::control::ControlOps for Service {
    fn status(&self) -> crate::control::ServeStatus {
        let engine = Service::status(self);
        let hydration = match self.hydrator() {
            Some(h) => crate::control::HydrationStatus {
                paused: h.is_paused(),
                rate_bytes_per_sec: h.rate.get(),
                done: engine.chunks_missing == 0,
            },
            None => crate::control::HydrationStatus {
                done: engine.chunks_missing == 0,
                ..Default::default()
            },
        };
        crate::control::ServeStatus {
            engine,
            mode: self.mode(),
            vm_connected: self.vm_connected(),
            hydration,
            last_error: self.last_error(),
        }
    }

    fn fetched_bytes(&self) -> crate::control::FetchedBytes {
        use std::sync::atomic::Ordering::Relaxed;
        match self.engine() {
            Some(e) => crate::control::FetchedBytes {
                demand: e.counters().fetched_demand.load(Relaxed),
                background: e.counters().fetched_background.load(Relaxed),
            },
            None => crate::control::FetchedBytes::default(),
        }
    }

    fn confirm(&self) -> Result<String, crate::control::ControlError> {
        Service::confirm(self).map_err(control_error)
    }

    fn commit(&self) -> Result<String, crate::control::ControlError> {
        let me = self.me.lock().upgrade().ok_or_else(|| {
            crate::control::ControlError::Internal("service is shutting down".into())
        })?;
        Service::commit(&me).map_err(control_error)
    }

    fn rollback(&self) -> Result<String, crate::control::ControlError> {
        Service::rollback(self).map_err(control_error)
    }

    fn set_hydration(
        &self,
        paused: Option<bool>,
        rate: Option<u64>,
    ) -> Result<String, crate::control::ControlError> {
        let h = self.hydrator().ok_or_else(|| {
            crate::control::ControlError::Conflict("no hydration is running".into())
        })?;
        if let Some(p) = paused {
            h.set_paused(p);
        }
        if let Some(r) = rate {
            h.rate.set(r);
        }
        Ok(format!(
            "hydration {}, rate {}",
            if h.is_paused() { "paused" } else { "running" },
            match h.rate.get() {
                0 => "unlimited".to_string(),
                r => format!("{r} bytes/s"),
            }
        ))
    }

    fn set_target_urls(&self, urls: &[String]) -> Result<String, crate::control::ControlError> {
        use crate::control::ControlError;
        let engine = self.engine().ok_or_else(|| {
            ControlError::Conflict("not serving a target (no source to replace)".into())
        })?;
        let source = engine.source();
        match source.replace_urls(urls) {
            Ok(()) => Ok(format!("target URLs replaced: {}", source.name())),
            Err(e) if e.is_transient() => Err(ControlError::Internal(format!(
                "cannot check the new URLs, nothing changed: {e}"
            ))),
            Err(e) => Err(ControlError::BadRequest(format!(
                "new URLs refused, nothing changed: {e}"
            ))),
        }
    }
}

fn control_error(e: ServiceError) -> crate::control::ControlError {
    match e {
        ServiceError::Conflict(m) => crate::control::ControlError::Conflict(m),
        ServiceError::Transition(c) => crate::control::ControlError::Conflict(c.to_string()),
        other => crate::control::ControlError::Internal(other.to_string()),
    }
}
