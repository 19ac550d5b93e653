//! Pod sources: the manifest folder (standalone mode, static pods) and, in cluster mode, the API.
//! A source only says what it wants; pod workers alone decide what happens. Manifests are read
//! by `yaml` (bounded, YAML 1.1 as upstream reads it) and checked by `validation` (as the API
//! server checks them) before anything else sees them; `merge` makes the sources one desired set.

pub mod manifest;
pub mod merge;
pub mod mutate;
pub mod validation;
pub mod yaml;
