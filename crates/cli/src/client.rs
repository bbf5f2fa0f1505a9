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
    /// The `Authorization` header sent with every request, if any
    /// (validated once, shared by every request).
    authorization: Option<hyper::header::HeaderValue>,
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
            authorization: None,
        }
    }

    /// The same client (sharing its connections), sending `token` as a bearer token.
    pub fn with_token(&self, token: &str) -> FhirClient {
        FhirClient {
            authorization: hyper::header::HeaderValue::from_str(&format!("Bearer {token}")).ok(),
            ..self.clone()
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The `Authorization` header value this client sends, if any.
    pub fn authorization(&self) -> Option<&str> {
        self.authorization.as_ref().and_then(|a| a.to_str().ok())
    }

    /// Send a request; returns the status and the raw body.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(u16, Bytes)> {
        self.send_with(method, path, body, &[]).await
    }

    /// [`FhirClient::send`] with extra request headers (a later one replaces an earlier).
    pub async fn send_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
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
        if let Some(a) = &self.authorization {
            req = req.header(hyper::header::AUTHORIZATION, a.clone());
        }
        if let Some(h) = req.headers_mut() {
            for (k, v) in headers {
                h.insert(
                    hyper::header::HeaderName::from_bytes(k.as_bytes())?,
                    hyper::header::HeaderValue::from_str(v)?,
                );
            }
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

impl FhirClient {
    /// POST a form (the OAuth token endpoint) and parse the JSON answer.
    pub async fn form(&self, path: &str, pairs: &[(&str, &str)]) -> anyhow::Result<(u16, Value)> {
        let mut body = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            body.append_pair(k, v);
        }
        let (status, bytes) = self
            .send_with(
                "POST",
                path,
                Some(body.finish().into_bytes()),
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("accept", "application/json"),
                ],
            )
            .await?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)?
        };
        Ok((status, v))
    }
}
