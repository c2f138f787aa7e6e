//! Bearer-token authentication as a tower layer: when a token is configured,
//! every RPC except `grpc.health.v1` (probes carry no credentials) must send
//! `authorization: Bearer <token>`, or gets `UNAUTHENTICATED`.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

#[derive(Clone)]
pub struct AuthLayer {
    token: Option<Arc<str>>,
}

impl AuthLayer {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(Arc::from),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            token: self.token.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    token: Option<Arc<str>>,
}

/// Compares without an early exit, so response time does not reveal how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(expected: &str, header: Option<&http::HeaderValue>) -> bool {
    header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), expected.as_bytes()))
}

impl<S, B, RB> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let allowed = match &self.token {
            None => true,
            Some(token) => {
                req.uri().path().starts_with(HEALTH_PREFIX)
                    || authorized(token, req.headers().get(http::header::AUTHORIZATION))
            }
        };
        if allowed {
            Either::Left(self.inner.call(req))
        } else {
            let status = tonic::Status::unauthenticated(
                "missing or invalid bearer token: send `authorization: Bearer <token>`",
            );
            Either::Right(ready(Ok(status.into_http())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_bearer_header() {
        let ok = http::HeaderValue::from_static("Bearer s3cret");
        let bad = http::HeaderValue::from_static("Bearer s3cre");
        let basic = http::HeaderValue::from_static("Basic s3cret");
        assert!(authorized("s3cret", Some(&ok)));
        assert!(!authorized("s3cret", Some(&bad)));
        assert!(!authorized("s3cret", Some(&basic)));
        assert!(!authorized("s3cret", None));
    }
}
