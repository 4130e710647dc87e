//! Manifests as the registry sees them: media types, what a client's `Accept` admits, and the
//! validation that tells which blobs and child manifests a manifest references.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Digest, Error};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What we ask upstreams for: every manifest type, so nothing is ever converted.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.artifact.manifest.v1+json, application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5";

/// The media types an `Accept` header lists, without parameters; `None` when it accepts anything
/// (no header, or a wildcard).
fn accepted_types(accept: Option<&str>) -> Option<Vec<&str>> {
    let mut types: Vec<&str> = Vec::new();
    for t in accept?.split(',') {
        let t = t.split(';').next().unwrap_or_default().trim();
        if t == "*/*" || t == "application/*" {
            return None;
        }
        if !t.is_empty() && !types.contains(&t) {
            types.push(t);
        }
    }
    (!types.is_empty()).then_some(types)
}

/// May a client that sent `accept` be given a manifest of `media_type`? A request without an
/// `Accept` header, or with a wildcard, takes any type.
pub fn acceptable(media_type: &str, accept: Option<&str>) -> bool {
    accepted_types(accept).is_none_or(|types| types.contains(&media_type))
}

/// The `Accept` to send upstream for a client's request: the types it lists (sorted, so that
/// clients listing the same types share one upstream request), or every manifest type.
pub fn upstream_accept(accept: Option<&str>) -> String {
    match accepted_types(accept) {
        Some(mut types) => {
            types.sort_unstable();
            types.join(", ")
        }
        None => ACCEPT_ALL.to_string(),
    }
}

/// A parsed manifest: its meta for storage and the content it references.
pub struct Described {
    pub meta: ManifestMeta,
    /// Blobs (config, layers) that must exist in the repository.
    pub blobs: Vec<Digest>,
    /// Child manifests (of an index) that must exist in the repository.
    pub children: Vec<Digest>,
}

fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// Validate a manifest's JSON and extract what it references. `content_type` is what the client
/// or upstream said; the body's own `mediaType` is used when the header is missing or generic.
pub fn describe(bytes: &[u8], content_type: Option<&str>) -> Result<Described, Error> {
    let invalid = |why: &str| Error::ManifestInvalid(why.to_string());
    let json: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(&format!("manifest is not valid JSON: {e}")))?;
    let obj = json.as_object().ok_or_else(|| invalid("manifest must be a JSON object"))?;
    let body_type = obj.get("mediaType").and_then(Value::as_str);
    let header_type = content_type
        .map(|c| c.split(';').next().unwrap_or_default().trim())
        .filter(|c| !c.is_empty() && *c != "application/json" && *c != "application/octet-stream");
    if let (Some(h), Some(b)) = (header_type, body_type) {
        if h != b {
            return Err(invalid(&format!("Content-Type {h:?} does not match the manifest's mediaType {b:?}")));
        }
    }
    let media_type = header_type.or(body_type).map(str::to_string).unwrap_or_else(|| {
        if obj.contains_key("manifests") {
            OCI_INDEX.to_string()
        } else {
            OCI_MANIFEST.to_string()
        }
    });
    let schema = obj.get("schemaVersion").and_then(Value::as_u64);
    if schema != Some(2) && !media_type.contains("manifest.v1") {
        return Err(invalid("schemaVersion must be 2"));
    }
    let descriptor_digest = |d: &Value, what: &str| -> Result<Digest, Error> {
        let s = d.get("digest").and_then(Value::as_str).ok_or_else(|| invalid(&format!("{what} has no digest")))?;
        s.parse::<Digest>().map_err(|_| invalid(&format!("{what} has an invalid digest {s:?}")))
    };
    let mut blobs = Vec::new();
    let mut children = Vec::new();
    if is_index(&media_type) || obj.contains_key("manifests") {
        let list = obj
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("an index needs a manifests array"))?;
        for m in list {
            children.push(descriptor_digest(m, "manifests[]")?);
        }
    } else {
        if let Some(config) = obj.get("config") {
            blobs.push(descriptor_digest(config, "config")?);
        }
        for l in obj.get("layers").and_then(Value::as_array).into_iter().flatten() {
            // Foreign (non-distributable) layers live elsewhere and need not be here.
            if l.get("urls").is_none() {
                blobs.push(descriptor_digest(l, "layers[]")?);
            }
        }
        for b in obj.get("blobs").and_then(Value::as_array).into_iter().flatten() {
            blobs.push(descriptor_digest(b, "blobs[]")?);
        }
    }
    let subject = match obj.get("subject") {
        Some(s) => Some(descriptor_digest(s, "subject")?),
        None => None,
    };
    // Referrers report artifactType, falling back to the config's media type (spec 1.1).
    let artifact_type = obj
        .get("artifactType")
        .and_then(Value::as_str)
        .or_else(|| obj.get("config").and_then(|c| c.get("mediaType")).and_then(Value::as_str))
        .map(str::to_string);
    let annotations = obj.get("annotations").and_then(Value::as_object).cloned();
    Ok(Described {
        meta: ManifestMeta { media_type, size: bytes.len() as u64, artifact_type, subject, annotations },
        blobs,
        children,
    })
}

/// How a manifest is recorded in a repository: what a referrers list and a response need.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestMeta {
    pub media_type: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers() {
        let docker_only = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json;q=0.9";
        assert!(acceptable(DOCKER_LIST, Some(docker_only)));
        assert!(!acceptable(OCI_INDEX, Some(docker_only)));
        assert!(acceptable(OCI_INDEX, None));
        assert!(acceptable(OCI_INDEX, Some("application/json, */*")));
        assert_eq!(
            upstream_accept(Some(docker_only)),
            "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json"
        );
        assert_eq!(upstream_accept(None), ACCEPT_ALL);
        assert_eq!(upstream_accept(Some("*/*")), ACCEPT_ALL);
    }
}
