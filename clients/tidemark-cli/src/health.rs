//! `tidemark health`: each service's `grpc.health.v1` status at its
//! endpoint, as the Kubernetes readiness probes ask for it.

use serde_json::json;
use tidemark_client::{ClientError, Service, ServingStatus, Tidemark};

use crate::error::{CliError, CliResult};
use crate::output::{Output, table};

#[derive(clap::Args)]
pub struct HealthArgs {
    /// Ask only these services (job-tracker, replicator, verifier,
    /// stats-aggregator); default: all four.
    #[arg(long = "service", value_name = "NAME", value_parser = parse_service)]
    pub services: Vec<Service>,
}

fn parse_service(name: &str) -> Result<Service, String> {
    Service::ALL
        .into_iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| {
            format!(
                "unknown service {name:?}: one of {}",
                Service::ALL.map(Service::name).join(", ")
            )
        })
}

/// Exits 0 when every service asked is `SERVING`; 6 when one answers
/// otherwise, 5 when one cannot be reached.
pub async fn run(client: &Tidemark, args: HealthArgs, out: Output) -> CliResult {
    let services = if args.services.is_empty() {
        Service::ALL.to_vec()
    } else {
        args.services
    };
    let mut rows = Vec::new();
    let mut unreachable: Option<ClientError> = None;
    for service in services {
        let endpoint = client.options().endpoint_of(service).to_owned();
        let status = match client.health(service).await {
            Ok(s) => s.as_str_name().to_owned(),
            Err(e) => {
                let shown = format!("UNREACHABLE ({e})");
                unreachable.get_or_insert(e);
                shown
            }
        };
        rows.push((service, endpoint, status));
    }
    let json = json!(
        rows.iter()
            .map(|(s, e, st)| json!({"service": s.name(), "endpoint": e, "status": st}))
            .collect::<Vec<_>>()
    );
    out.print(&json, || {
        table(
            &["SERVICE", "ENDPOINT", "STATUS"],
            rows.iter()
                .map(|(s, e, st)| vec![s.name().to_owned(), e.clone(), st.clone()]),
        )
    });
    if let Some(e) = unreachable {
        return Err(e.into());
    }
    let serving = ServingStatus::Serving.as_str_name();
    let not_serving: Vec<&str> = rows
        .iter()
        .filter(|(_, _, st)| st != serving)
        .map(|(s, _, _)| s.name())
        .collect();
    if not_serving.is_empty() {
        Ok(())
    } else {
        Err(CliError::failed(
            format!("not serving: {}", not_serving.join(", ")),
            "a service is NOT_SERVING while a backend it needs is unreachable or it is shutting down: see its log",
        ))
    }
}
