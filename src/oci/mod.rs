//! The vocabulary of the OCI distribution spec: digests and hashing, repository names and
//! references, manifest media types and the manifest parser. A leaf: every other module may use
//! it, and it uses none of them.

mod manifest;
mod names;

pub use manifest::{
    acceptable, describe, upstream_accept, Described, ManifestMeta, ACCEPT_ALL, DOCKER_LIST, DOCKER_MANIFEST,
    OCI_INDEX, OCI_MANIFEST,
};
pub use names::{valid_tag, Algorithm, Digest, Hasher, Reference, RepoName};

/// Input that breaks the spec's grammar, by what it is (the API layer maps each to its error code).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NameInvalid(String),
    #[error("{0}")]
    DigestInvalid(String),
    #[error("{0}")]
    TagInvalid(String),
    #[error("{0}")]
    ManifestInvalid(String),
}
