//! SigV4 for managed OpenSearch, against the local Elasticsearch behind a
//! proxy that checks every request's AWS Signature Version 4 the way
//! Amazon OpenSearch Service does (recomputed here from the request it
//! received, with the secret key, independently of the signer) and only
//! then passes it on. The sink writes, reads and lists through it; an
//! unsigned request and a replayed signature over another body are refused.

use std::sync::{Arc, Mutex};

use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use tidemark_connectors::elasticsearch::ElasticsearchSink;
use tidemark_connectors::testing::{local_env, unique_name};
use tidemark_connectors::{AttrValue, Key, KeySchema, Sink as _, SinkOp, SinkRecord};

const ACCESS_KEY: &str = "AKIDTIDEMARKSIGV4";
const SECRET_KEY: &str = "tidemark/sigv4+secret";
const REGION: &str = "eu-west-1";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// RFC 3986 encoding as SigV4 wants it: unreserved characters kept, every
/// other byte `%XX` in upper case.
fn uri_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why the request's signature is not valid, if it is not.
fn check_signature(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| format!("no {name} header"))
    };
    let auth = header("authorization")?;
    let fields = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not AWS4-HMAC-SHA256")?;
    let field = |name: &str| {
        fields
            .split(", ")
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .ok_or_else(|| format!("no {name} in the authorization header"))
    };
    let credential = field("Credential")?;
    let signed_headers = field("SignedHeaders")?;
    let signature = field("Signature")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [key, date, region, service, "aws4_request"] = scope[..] else {
        return Err(format!("bad credential scope {credential}"));
    };
    if key != ACCESS_KEY || region != REGION || service != "es" {
        return Err(format!("signed for {key} {region} {service}"));
    }
    let amz_date = header("x-amz-date")?;
    if !amz_date.starts_with(date) {
        return Err("x-amz-date is not the scope's day".to_owned());
    }
    let payload_hash = header("x-amz-content-sha256")?;
    if payload_hash != sha256_hex(body) {
        return Err("x-amz-content-sha256 is not the body's".to_owned());
    }
    if !signed_headers.split(';').any(|h| h == "host") {
        return Err("host is not signed".to_owned());
    }
    // Every path segment encoded once more (all services but S3).
    let canonical_uri = uri
        .path()
        .split('/')
        .map(uri_encode)
        .collect::<Vec<_>>()
        .join("/");
    let mut query: Vec<(String, String)> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k)),
                uri_encode(&percent_decode(v)),
            )
        })
        .collect();
    query.sort();
    let canonical_query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut canonical_headers = String::new();
    for name in signed_headers.split(';') {
        let value = header(name)?;
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        canonical_headers.push_str(&format!("{name}:{value}\n"));
    }
    let canonical_request = format!(
        "{method}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{payload_hash}"
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{date}/{region}/{service}/aws4_request\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let mut signing_key = hmac(format!("AWS4{SECRET_KEY}").as_bytes(), date);
    for part in [region, service, "aws4_request"] {
        signing_key = hmac(&signing_key, part);
    }
    let expected = hex(&hmac(&signing_key, &string_to_sign));
    if expected == signature {
        Ok(())
    } else {
        Err(format!(
            "signature mismatch; canonical request was:\n{canonical_request}"
        ))
    }
}

#[derive(Default)]
struct Seen {
    verified: usize,
    refused: Vec<String>,
    /// The signature headers of the last verified request.
    last: Option<HeaderMap>,
}

/// The checking proxy in front of `upstream`; its URL.
async fn signing_proxy(upstream: String, seen: Arc<Mutex<Seen>>) -> String {
    let client = reqwest::Client::new();
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (client, upstream, seen) = (client.clone(), upstream.clone(), seen.clone());
            async move {
                if let Err(why) = check_signature(&method, &uri, &headers, &body) {
                    seen.lock().unwrap().refused.push(why.clone());
                    return (StatusCode::FORBIDDEN, format!("{{\"message\":{why:?}}}"));
                }
                {
                    let mut seen = seen.lock().unwrap();
                    seen.verified += 1;
                    seen.last = Some(headers.clone());
                }
                let path = uri.path_and_query().map_or("/", |p| p.as_str());
                let mut request = client
                    .request(method, format!("{}{path}", upstream.trim_end_matches('/')))
                    .body(body);
                if let Some(t) = headers.get("content-type") {
                    request = request.header("content-type", t);
                }
                let response = request.send().await.expect("elasticsearch answers");
                let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
                (status, response.text().await.unwrap_or_default())
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn key(pk: &str) -> Key {
    Key::new([("pk".to_owned(), AttrValue::s(pk))])
}

#[tokio::test]
async fn the_sink_signs_every_request_and_a_checking_endpoint_accepts_them() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let proxy = signing_proxy(local_env("TIDEMARK_TEST_ELASTICSEARCH_URL"), seen.clone()).await;

    let index = unique_name("sigv4");
    let credentials = SharedCredentialsProvider::new(Credentials::new(
        ACCESS_KEY, SECRET_KEY, None, None, "test",
    ));
    let sink = ElasticsearchSink::connect_sigv4(
        &proxy,
        &index,
        KeySchema::new("pk", None),
        "es",
        REGION,
        credentials,
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "open through the signing proxy: {e}; refused: {:?}",
            seen.lock().unwrap().refused
        )
    });
    // A key that needs encoding in the document's URL, and a body.
    let records: Vec<SinkRecord> = ["plain", "a/b c+é"]
        .iter()
        .map(|pk| {
            let mut item = key(pk).0;
            item.insert("title".to_owned(), AttrValue::s(format!("signed {pk}")));
            SinkRecord {
                key: key(pk),
                version: 1,
                op: SinkOp::Upsert(item),
            }
        })
        .collect();
    let outcomes = sink
        .apply(&records)
        .await
        .expect("bulk write through the proxy");
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    let (version, item) = sink
        .read(&key("a/b c+é"))
        .await
        .expect("read by key through the proxy")
        .expect("the document is there");
    assert_eq!(version, 1);
    assert_eq!(item.get("title"), Some(&AttrValue::s("signed a/b c+é")));
    let mut listed = 0;
    sink.entries(&mut |_, _, _| listed += 1)
        .await
        .expect("list through the proxy");
    assert_eq!(listed, 2);
    {
        let seen = seen.lock().unwrap();
        assert!(seen.refused.is_empty(), "refused: {:?}", seen.refused);
        assert!(seen.verified >= 4, "{} verified requests", seen.verified);
    }

    // The proxy does check: an unsigned request, and the last signature
    // replayed over another body (with that body's hash), are refused.
    let http = reqwest::Client::new();
    let unsigned = http
        .get(format!("{proxy}/{index}/_count"))
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status().as_u16(), 403);
    let last = seen
        .lock()
        .unwrap()
        .last
        .clone()
        .expect("a verified request");
    let body = br#"{"query":{"match_all":{}}}"#.to_vec();
    let mut replay = http
        .post(format!("{proxy}/{index}/_search"))
        .body(body.clone());
    for name in ["authorization", "x-amz-date"] {
        replay = replay.header(name, last.get(name).unwrap().clone());
    }
    let replayed = replay
        .header("x-amz-content-sha256", sha256_hex(&body))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status().as_u16(), 403);
    let refused = seen.lock().unwrap().refused.clone();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[0].contains("no authorization header"),
        "{refused:?}"
    );
    assert!(refused[1].contains("signature mismatch"), "{refused:?}");
}
