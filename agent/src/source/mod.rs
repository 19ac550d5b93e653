//! Pod sources: the manifest folder (standalone mode, static pods) and, in cluster mode, the API.
//! A source only says what it wants; pod workers alone decide what happens.

pub mod manifest;
