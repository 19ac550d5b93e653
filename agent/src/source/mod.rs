//! Pod sources: the manifest folder (standalone mode, static pods) and, in cluster mode, the API.
