//! AWS Signature Version 4 for managed OpenSearch: every request to an
//! Amazon OpenSearch Service domain (`es`) or an OpenSearch Serverless
//! collection (`aoss`) signed with the process's AWS credentials (the SDK's
//! default chain: environment, profile, IRSA web identity, ECS or instance
//! role), refreshed before they expire.

use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials as _, SharedCredentialsProvider};
use aws_sigv4::http_request::{
    PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use tokio::sync::{Mutex, OnceCell};

use super::BACKEND;
use crate::error::{ConnectorError, ConnectorResult};

/// Credentials are renewed this long before they expire.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

/// Signs requests for one service in one region.
pub(super) struct Signer {
    service: String,
    /// `None`: the SDK's region (`AWS_REGION`, the profile).
    region: Option<String>,
    aws: OnceCell<(String, SharedCredentialsProvider)>,
    current: Mutex<Option<aws_credential_types::Credentials>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("service", &self.service)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Signs with the SDK's default credentials chain, loaded at the first
    /// request.
    pub(super) fn new(service: &str, region: Option<&str>) -> Self {
        Self {
            service: service.to_owned(),
            region: region.map(str::to_owned),
            aws: OnceCell::new(),
            current: Mutex::new(None),
        }
    }

    /// Signs with `credentials` for `region`.
    pub(super) fn with_credentials(
        service: &str,
        region: &str,
        credentials: SharedCredentialsProvider,
    ) -> Self {
        Self {
            service: service.to_owned(),
            region: Some(region.to_owned()),
            aws: OnceCell::new_with(Some((region.to_owned(), credentials))),
            current: Mutex::new(None),
        }
    }

    /// The region and the credentials provider, loaded once.
    async fn aws(&self) -> ConnectorResult<&(String, SharedCredentialsProvider)> {
        self.aws
            .get_or_try_init(|| async {
                let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .load()
                    .await;
                let region = match &self.region {
                    Some(r) => r.clone(),
                    None => config.region().map(ToString::to_string).ok_or_else(|| {
                        ConnectorError::invalid(
                            BACKEND,
                            format!(
                                "SigV4 signing needs a region: set {} or AWS_REGION",
                                super::client::SIGV4_REGION_ENV
                            ),
                        )
                    })?,
                };
                let provider = config.credentials_provider().ok_or_else(|| {
                    ConnectorError::invalid(
                        BACKEND,
                        "SigV4 signing found no AWS credentials provider",
                    )
                })?;
                Ok((region, provider))
            })
            .await
    }

    async fn credentials(
        &self,
        provider: &SharedCredentialsProvider,
    ) -> ConnectorResult<aws_credential_types::Credentials> {
        let mut current = self.current.lock().await;
        let fresh = current.as_ref().is_some_and(|c| {
            c.expiry()
                .is_none_or(|at| SystemTime::now() + RENEW_BEFORE < at)
        });
        if !fresh {
            let got =
                provider
                    .provide_credentials()
                    .await
                    .map_err(|e| ConnectorError::Retryable {
                        backend: BACKEND,
                        message: format!("AWS credentials for SigV4: {e}"),
                        retry_after: None,
                    })?;
            *current = Some(got);
        }
        Ok(current.clone().expect("credentials were just set"))
    }

    /// Adds the signature headers (`authorization`, `x-amz-date`,
    /// `x-amz-content-sha256`, and `x-amz-security-token` for temporary
    /// credentials) to `request`, over its method, URL, headers and body.
    pub(super) async fn sign(&self, request: &mut reqwest::Request) -> ConnectorResult<()> {
        let (region, provider) = self.aws().await?;
        let identity = self.credentials(provider).await?.into();
        sign_with(request, &identity, region, &self.service, SystemTime::now())
    }
}

/// Signs `request` as of `time`.
pub(super) fn sign_with(
    request: &mut reqwest::Request,
    identity: &aws_smithy_runtime_api::client::identity::Identity,
    region: &str,
    service: &str,
    time: SystemTime,
) -> ConnectorResult<()> {
    let failed = |e: &dyn std::fmt::Display| {
        ConnectorError::terminal(BACKEND, format!("cannot sign the request (SigV4): {e}"))
    };
    let mut settings = SigningSettings::default();
    // Serverless collections require the payload hash header; domains
    // accept it.
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let params = v4::SigningParams::builder()
        .identity(identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| failed(&e))?
        .into();
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    let body = match request.body() {
        None => SignableBody::Bytes(&[]),
        Some(body) => body
            .as_bytes()
            .map_or(SignableBody::UnsignedPayload, SignableBody::Bytes),
    };
    let signable = SignableRequest::new(
        request.method().as_str(),
        request.url().as_str(),
        headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        body,
    )
    .map_err(|e| failed(&e))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| failed(&e))?
        .into_parts();
    let (signed, _params) = instructions.into_parts();
    for header in signed {
        let mut value =
            reqwest::header::HeaderValue::from_str(header.value()).map_err(|e| failed(&e))?;
        value.set_sensitive(header.sensitive());
        request.headers_mut().insert(header.name(), value);
    }
    Ok(())
}
