//! `grpc.health.v1` status per service, driven by the host's lifecycle and by
//! probes of each service's backends.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Shared handle on the health status of every service in a host.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Arc<Mutex<Vec<String>>>,
}

impl Health {
    pub(crate) fn new(reporter: HealthReporter) -> Self {
        Self {
            reporter,
            services: Arc::default(),
        }
    }

    pub(crate) fn register(&self, service: &str) {
        let mut services = self.services.lock().expect("health lock");
        if !services.iter().any(|s| s == service) {
            services.push(service.to_owned());
        }
    }

    /// Names of the services this host serves (fully qualified gRPC names).
    pub fn services(&self) -> Vec<String> {
        self.services.lock().expect("health lock").clone()
    }

    pub async fn set(&self, service: &str, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(service, status).await;
    }

    /// Marks the whole host and every service NOT_SERVING (start of shutdown).
    pub async fn set_all_not_serving(&self) {
        for service in self.services() {
            self.set(&service, false).await;
        }
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }

    /// Runs `probe` every `interval` until `shutdown`, reporting `service`
    /// SERVING while the probe succeeds and NOT_SERVING while it fails, so
    /// readiness follows backend reachability.
    pub async fn watch_backend<F, Fut>(
        self,
        service: String,
        interval: Duration,
        shutdown: CancellationToken,
        mut probe: F,
    ) where
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<(), String>> + Send,
    {
        let mut last = None;
        loop {
            let ok = match probe().await {
                Ok(()) => true,
                Err(reason) => {
                    if last != Some(false) {
                        tracing::warn!(service = %service, %reason, "backend unreachable; reporting not serving");
                    }
                    false
                }
            };
            if last != Some(ok) {
                if ok && last.is_some() {
                    tracing::info!(service = %service, "backend reachable again; reporting serving");
                }
                self.set(&service, ok).await;
                last = Some(ok);
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}
