//! Which endpoints a request may point a service at (#19 security). A
//! store in a request may name its own endpoint (a DynamoDB or S3 endpoint,
//! an Elasticsearch URL, Kafka bootstrap servers); the replicator and the
//! verifier then call it with their own credentials (their IAM role), so an
//! unchecked endpoint lets any caller make them reach any host. Requests may
//! name the service's own configured endpoints and those in its
//! `allowed_endpoints`; anything else is INVALID_ARGUMENT on the store's
//! field.

/// The endpoints a request may name, as `host:port` (scheme and path do
/// not matter: the same host and port reach the same service).
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    any: bool,
    hosts: Vec<String>,
}

/// `host:port` of a URL or a `host:port` (Kafka), lowercased, with the
/// scheme's default port when none is given.
fn authority(endpoint: &str) -> String {
    let e = endpoint.trim();
    let (scheme, rest) = match e.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => (String::new(), e),
    };
    let rest = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // Credentials in the URL are not part of where it goes.
    let host = rest
        .rsplit_once('@')
        .map_or(rest, |(_, h)| h)
        .to_ascii_lowercase();
    // `[::1]` has no port; `[::1]:80` and `host:80` have one.
    let has_port = host.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && (!h.starts_with('[') || h.ends_with(']'))
    });
    if has_port {
        host
    } else {
        match scheme.as_str() {
            "https" => format!("{host}:443"),
            "http" => format!("{host}:80"),
            _ => host,
        }
    }
}

impl AllowList {
    /// The service's own endpoints, plus `allowed` (comma-separated; `*`
    /// allows any endpoint).
    pub fn new<'a>(own: impl IntoIterator<Item = &'a str>, allowed: &str) -> Self {
        let mut list = Self::default();
        for entry in own
            .into_iter()
            .flat_map(|e| e.split(','))
            .chain(allowed.split(','))
        {
            let entry = entry.trim();
            if entry == "*" {
                list.any = true;
            } else if !entry.is_empty() {
                list.hosts.push(authority(entry));
            }
        }
        list
    }

    /// Whether a request may name `endpoint` (empty: the service's own,
    /// always allowed). A Kafka bootstrap list is allowed when every one of
    /// its brokers is.
    ///
    /// # Errors
    /// What to tell the caller: the endpoint and how to allow it.
    pub fn check(&self, endpoint: &str) -> Result<(), String> {
        if self.any || endpoint.trim().is_empty() {
            return Ok(());
        }
        for one in endpoint.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if !self.hosts.contains(&authority(one)) {
                return Err(format!(
                    "endpoint {one:?} is not one this service may reach: name no endpoint to use the service's own, or add it to the service's allowed_endpoints (TIDEMARK_ALLOWED_ENDPOINTS)"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_and_listed_endpoints_pass_and_others_are_refused() {
        let list = AllowList::new(
            [
                "http://127.0.0.1:5000",
                "https://search.internal",
                "k1:9092,k2:9092",
            ],
            "http://dynamodb.eu-west-1.amazonaws.com, s3.eu-west-1.amazonaws.com:443",
        );
        for ok in [
            "",
            "http://127.0.0.1:5000/",
            "HTTP://127.0.0.1:5000",
            "https://search.internal:443/",
            "https://user:secret@search.internal",
            "k1:9092",
            "k2:9092,k1:9092",
            "https://dynamodb.eu-west-1.amazonaws.com:80",
            "https://s3.eu-west-1.amazonaws.com",
        ] {
            assert!(list.check(ok).is_ok(), "{ok} is allowed");
        }
        for refused in [
            "http://169.254.169.254",
            "http://127.0.0.1:5001",
            "http://search.internal",
            "k1:9092,evil:9092",
            "https://search.internal.evil.com",
        ] {
            let err = list.check(refused).unwrap_err();
            assert!(err.contains("allowed_endpoints"), "{refused}: {err}");
        }
    }

    #[test]
    fn a_star_allows_any_endpoint() {
        let list = AllowList::new([], "*");
        assert!(list.check("http://anything:1").is_ok());
        assert!(AllowList::new([], "").check("http://anything:1").is_err());
    }
}
