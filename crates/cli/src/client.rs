//! A small HTTP/1.1 client over hyper for the demo and the benchmark's load
//! generator (keep-alive connections, JSON bodies).
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A keep-alive JSON client for one base URL.
#[derive(Clone)]
pub struct FhirClient {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl FhirClient {
    pub fn new(base: &str) -> FhirClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        FhirClient {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Send a request; returns the status and the raw body.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(u16, Bytes)> {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}/{}", self.base, path.trim_start_matches('/'))
        };
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .header("accept", "application/fhir+json");
        if body.is_some() {
            req = req.header("content-type", "application/fhir+json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = self.http.request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    /// Send JSON and parse the JSON answer.
    pub async fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let (status, bytes) = self.send(method, path, body).await?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)?
        };
        Ok((status, v))
    }
}
