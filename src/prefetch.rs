//! `regmirror prefetch IMAGE...`: pull images through a running mirror so its cache is warm
//! before a rollout. Progress bars on a terminal, plain lines otherwise; non-zero exit on failure.

use std::io::IsTerminal;
use std::sync::Arc;

use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::Digest as _;

use crate::oci::ACCEPT_ALL;
use crate::upstream::auth::Challenge;

/// Why a prefetch failed.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    #[error("{0:?} is not an image reference")]
    Image(String),
    #[error("{url}: {detail}")]
    Request { url: String, detail: String },
    #[error("{url}: the mirror refused access")]
    Refused { url: String },
    #[error("the mirror's CA or the HTTP client: {0}")]
    Client(String),
    #[error("{got} bytes, expected {size}")]
    Short { got: u64, size: u64 },
    #[error("{0} image(s) failed")]
    Failed(usize),
}

fn request_error(url: impl ToString, e: impl std::error::Error) -> PrefetchError {
    PrefetchError::Request { url: url.to_string(), detail: crate::upstream::error_chain(&e) }
}

/// An image as users write it, mapped to the mirror's path form (`docker.io/library/nginx`).
#[derive(Debug, PartialEq)]
pub struct ImageRef {
    pub name: String,
    pub reference: String,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, PrefetchError> {
        let (rest, reference) = match s.split_once('@') {
            Some((n, d)) => (n, d.to_string()),
            None => match s.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
                Some((n, t)) => (n, t.to_string()),
                None => (s, "latest".to_string()),
            },
        };
        let first = rest.split('/').next().unwrap_or_default();
        let has_registry = rest.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
        let name = if has_registry {
            rest.to_string()
        } else if rest.contains('/') {
            format!("docker.io/{rest}")
        } else {
            format!("docker.io/library/{rest}")
        };
        crate::oci::RepoName::parse(&name).map_err(|_| PrefetchError::Image(s.to_string()))?;
        Ok(ImageRef { name, reference })
    }
}

struct Client {
    http: reqwest::Client,
    base: reqwest::Url,
    token: tokio::sync::Mutex<Option<String>>,
}

impl Client {
    /// GET with the mirror's anonymous token flow when it asks for one.
    async fn get(&self, path: &str, accept: Option<&str>) -> Result<reqwest::Response, PrefetchError> {
        let url = self.base.join(path).map_err(|e| request_error(path, e))?;
        for _ in 0..2 {
            let mut req = self.http.get(url.clone());
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some(t) = self.token.lock().await.as_ref() {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            let resp = req.send().await.map_err(|e| request_error(&url, e))?;
            if resp.status() == StatusCode::UNAUTHORIZED {
                let challenge =
                    resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).and_then(Challenge::parse);
                if let Some(Challenge::Bearer { realm, service, scope }) = challenge {
                    let mut token_url = reqwest::Url::parse(&realm).map_err(|e| request_error(&realm, e))?;
                    {
                        let mut q = token_url.query_pairs_mut();
                        if let Some(s) = service {
                            q.append_pair("service", &s);
                        }
                        if let Some(s) = scope {
                            q.append_pair("scope", &s);
                        }
                    }
                    let token_error = |e| request_error(&realm, e);
                    let v: Value = self
                        .http
                        .get(token_url)
                        .send()
                        .await
                        .map_err(token_error)?
                        .json()
                        .await
                        .map_err(token_error)?;
                    *self.token.lock().await = v["token"].as_str().map(str::to_string);
                    continue;
                }
            }
            if !resp.status().is_success() {
                return Err(PrefetchError::Request { url: url.to_string(), detail: resp.status().to_string() });
            }
            return Ok(resp);
        }
        Err(PrefetchError::Refused { url: url.to_string() })
    }
}

/// Everything one image needs: its manifests (fetched here) and its blobs (digest, size). With
/// `referrers`, also every referrer of every manifest (signatures, SBOMs, attestations), and
/// theirs in turn: a signature of an SBOM counts.
async fn plan(
    client: &Client,
    image: &ImageRef,
    platform: Option<&str>,
    referrers: bool,
) -> Result<Vec<(String, u64)>, PrefetchError> {
    let manifest = |reference: String| {
        let path = format!("/v2/{}/manifests/{reference}", image.name);
        async move {
            let bytes =
                client.get(&path, Some(ACCEPT_ALL)).await?.bytes().await.map_err(|e| request_error(&path, e))?;
            let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
            let json = serde_json::from_slice::<Value>(&bytes).map_err(|e| request_error(&path, e))?;
            Ok::<_, PrefetchError>((digest, json))
        }
    };
    let (top_digest, top) = manifest(image.reference.clone()).await?;
    let mut images = Vec::new();
    let mut manifests = vec![top_digest];
    match top["manifests"].as_array() {
        Some(children) => {
            for child in children {
                let p = &child["platform"];
                let this = format!(
                    "{}/{}",
                    p["os"].as_str().unwrap_or_default(),
                    p["architecture"].as_str().unwrap_or_default()
                );
                if platform.is_none_or(|want| want == this) {
                    if let Some(d) = child["digest"].as_str() {
                        let (digest, m) = manifest(d.to_string()).await?;
                        manifests.push(digest);
                        images.push(m);
                    }
                }
            }
        }
        None => images.push(top),
    }
    if referrers {
        let mut seen = std::collections::HashSet::new();
        let mut found = 0;
        while let Some(subject) = manifests.pop() {
            if !seen.insert(subject.clone()) {
                continue;
            }
            let path = format!("/v2/{}/referrers/{subject}", image.name);
            let list: Value = client
                .get(&path, Some(crate::oci::OCI_INDEX))
                .await?
                .json()
                .await
                .map_err(|e| request_error(&path, e))?;
            for referrer in list["manifests"].as_array().into_iter().flatten() {
                let Some(d) = referrer["digest"].as_str() else { continue };
                let (digest, m) = manifest(d.to_string()).await?;
                found += 1;
                // An index among the referrers (an attestation index) brings its children.
                for child in m["manifests"].as_array().into_iter().flatten() {
                    if let Some(c) = child["digest"].as_str() {
                        let (child_digest, child) = manifest(c.to_string()).await?;
                        manifests.push(child_digest);
                        images.push(child);
                    }
                }
                manifests.push(digest);
                images.push(m);
            }
        }
        println!("{}: {found} referrer(s)", image.name);
    }
    let mut blobs = Vec::new();
    for m in &images {
        let descriptors = std::iter::once(&m["config"])
            .chain(m["layers"].as_array().into_iter().flatten())
            .chain(m["blobs"].as_array().into_iter().flatten());
        for desc in descriptors {
            if let (Some(d), Some(size)) = (desc["digest"].as_str(), desc["size"].as_u64()) {
                if !blobs.iter().any(|(x, _): &(String, u64)| x == d) {
                    blobs.push((d.to_string(), size));
                }
            }
        }
    }
    Ok(blobs)
}

pub async fn run(
    base: reqwest::Url,
    ca: Option<Vec<u8>>,
    images: &[String],
    platform: Option<&str>,
    referrers: bool,
) -> Result<(), PrefetchError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder();
    if let Some(pem) = ca {
        let ca = reqwest::Certificate::from_pem(&pem).map_err(|e| PrefetchError::Client(e.to_string()))?;
        builder = builder.tls_certs_merge([ca]);
    }
    let client = Arc::new(Client {
        http: builder.build().map_err(|e| PrefetchError::Client(e.to_string()))?,
        base,
        token: Default::default(),
    });
    let tty = std::io::stderr().is_terminal();
    let mut failures = 0;
    for image in images {
        let parsed = ImageRef::parse(image)?;
        let blobs = match plan(&client, &parsed, platform, referrers).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{image}: {e}");
                failures += 1;
                continue;
            }
        };
        let total: u64 = blobs.iter().map(|b| b.1).sum();
        let multi = MultiProgress::new();
        let overall = if tty {
            let bar = multi.add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template("{msg:30} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_message(image.clone());
            Some(bar)
        } else {
            println!("{image}: {} blobs, {total} bytes", blobs.len());
            None
        };
        let results = futures_util::stream::iter(blobs.into_iter().map(|(digest, size)| {
            let client = client.clone();
            let name = parsed.name.clone();
            let layer_bar = overall.as_ref().map(|_| {
                let bar = multi.add(ProgressBar::new(size));
                bar.set_style(
                    ProgressStyle::with_template("  {msg:28} [{bar:40}] {bytes}/{total_bytes}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_message(digest.chars().take(19).collect::<String>());
                bar
            });
            let overall = overall.clone();
            async move {
                let outcome = async {
                    let resp = client.get(&format!("/v2/{name}/blobs/{digest}"), None).await?;
                    let mut body = resp.bytes_stream();
                    let mut got = 0u64;
                    while let Some(chunk) = body.next().await {
                        let n = chunk.map_err(|e| request_error(&digest, e))?.len() as u64;
                        got += n;
                        if let Some(b) = &layer_bar {
                            b.inc(n);
                        }
                        if let Some(b) = &overall {
                            b.inc(n);
                        }
                    }
                    if got != size {
                        return Err(PrefetchError::Short { got, size });
                    }
                    Ok(())
                }
                .await;
                if let Some(b) = &layer_bar {
                    b.finish();
                }
                match &outcome {
                    Ok(()) if layer_bar.is_none() => println!("  {digest} {size} bytes ok"),
                    Err(e) => eprintln!("  {digest}: {e}"),
                    _ => {}
                }
                outcome
            }
        }))
        .buffer_unordered(3)
        .collect::<Vec<_>>()
        .await;
        if let Some(b) = overall {
            b.finish();
        }
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            failures += 1;
            eprintln!("{image}: {failed} blob(s) failed");
        } else {
            println!("{image}: done");
        }
    }
    if failures > 0 {
        return Err(PrefetchError::Failed(failures));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ImageRef;

    #[test]
    fn image_references() {
        let r = |s: &str| ImageRef::parse(s).unwrap();
        assert_eq!(r("nginx"), ImageRef { name: "docker.io/library/nginx".into(), reference: "latest".into() });
        assert_eq!(r("nginx:1.27").reference, "1.27");
        assert_eq!(r("org/tool:2").name, "docker.io/org/tool");
        assert_eq!(r("ghcr.io/org/tool:2.0").name, "ghcr.io/org/tool");
        assert_eq!(r("docker.io/library/alpine@sha256:abc").reference, "sha256:abc");
    }
}
