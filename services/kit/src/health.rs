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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tonic_health::pb::health_server::Health as _;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus as Wire};

    use super::*;

    async fn status(service: &tonic_health::server::HealthService, name: &str) -> i32 {
        service
            .check(tonic::Request::new(HealthCheckRequest {
                service: name.to_owned(),
            }))
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or(-1)
    }

    #[tokio::test]
    async fn follows_the_backend_probe() {
        let reporter = HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let health = Health::new(reporter);
        health.register("tidemark.x.v1.XService");
        let up = Arc::new(AtomicBool::new(false));
        let shutdown = CancellationToken::new();
        let probe_up = up.clone();
        let watcher = tokio::spawn(health.clone().watch_backend(
            "tidemark.x.v1.XService".to_owned(),
            Duration::from_millis(10),
            shutdown.clone(),
            move || {
                let up = probe_up.load(Ordering::SeqCst);
                async move {
                    if up {
                        Ok(())
                    } else {
                        Err("connection refused".to_owned())
                    }
                }
            },
        ));
        async fn wait_for(service: &tonic_health::server::HealthService, want: Wire) {
            for _ in 0..200 {
                if status(service, "tidemark.x.v1.XService").await == want as i32 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("health never became {want:?}");
        }
        wait_for(&service, Wire::NotServing).await;
        up.store(true, Ordering::SeqCst);
        wait_for(&service, Wire::Serving).await;
        up.store(false, Ordering::SeqCst);
        wait_for(&service, Wire::NotServing).await;
        health.set_all_not_serving().await;
        assert_eq!(
            status(&service, "").await,
            Wire::NotServing as i32,
            "shutdown turns the whole host NOT_SERVING"
        );
        shutdown.cancel();
        watcher.await.unwrap();
    }
}
