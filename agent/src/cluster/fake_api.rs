//! An in-process API server for the cluster loops' tests: a [`kube::Client`] whose requests are
//! answered from memory, so that a loop runs unchanged, on paused time, without a cluster.
//!
//! Objects are JSON kept by their path (`/api/v1/namespaces/default/pods/web`), each with a
//! UID and a resourceVersion the server assigns. It answers what the loops send: GET of an
//! object or a collection, list+watch (`?watch=true`: newline-delimited events from the
//! resourceVersion asked for, held open), POST (409 AlreadyExists when the name is taken), PUT
//! (409 on a stale resourceVersion), PATCH as a JSON merge patch or a strategic merge patch
//! (conditions and addresses merged by `type`), and DELETE with a UID precondition; a UID in a
//! patch or a body that is not the object's is a 409, as the API's precondition. A `/status`
//! subresource write changes only the status. What is missing answers 404 as a `Status`.
//!
//! Every request is recorded (method, path, query, content type, body, the code answered) for tests to assert on
//! what the agent sent, and [`FakeApi::fail`] makes the next requests to a path fail.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::channel::mpsc;
use futures::stream::{BoxStream, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use serde_json::{json, Value};

/// One request as the server received it.
#[derive(Clone, Debug)]
pub(super) struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    /// The JSON body (`Null` when there was none).
    pub body: Value,
    /// The HTTP status code answered.
    pub code: u16,
}

/// The in-memory API server; clones share it.
#[derive(Clone, Default)]
pub(super) struct FakeApi {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// By (collection path, name).
    objects: BTreeMap<(String, String), Value>,
    /// The last resourceVersion handed out (also the source of UIDs).
    version: u64,
    requests: Vec<Request>,
    failures: Vec<Failure>,
    /// Every change as a watch event line, by resourceVersion and collection.
    history: Vec<(u64, String, Value)>,
    watches: Vec<Watch>,
}

struct Failure {
    method: String,
    path: String,
    times: usize,
    code: u16,
}

struct Watch {
    collection: String,
    selector: Vec<(String, String)>,
    tx: mpsc::UnboundedSender<Bytes>,
}

type Body = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// An object path split as the API routes it: the collection, the name, a subresource.
struct Route {
    collection: String,
    name: Option<String>,
    sub: Option<String>,
}

fn route(path: &str) -> Route {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let prefix = if segments.first() == Some(&"apis") {
        3
    } else {
        2
    };
    let (head, rest) = segments.split_at(prefix.min(segments.len()));
    let scope = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        3
    } else {
        1
    };
    let (collection, tail) = rest.split_at(scope.min(rest.len()));
    Route {
        collection: format!("/{}/{}", head.join("/"), collection.join("/")),
        name: tail.first().map(|s| s.to_string()),
        sub: tail.get(1).map(|s| s.to_string()),
    }
}

/// Whether an object kept in `collection` is in the collection a client asked for: the same
/// one, or the same resource in all namespaces (`/api/v1/pods` for `/api/v1/namespaces/x/pods`).
fn within(collection: &str, asked: &str) -> bool {
    let segments: Vec<&str> = collection.split('/').collect();
    let all = match segments.iter().position(|s| *s == "namespaces") {
        Some(at) if at + 2 < segments.len() => {
            [&segments[..at], &segments[at + 2..]].concat().join("/")
        }
        _ => collection.to_string(),
    };
    asked == collection || asked == all
}

/// The value at a dotted path (`metadata.name`), as a string.
fn field(object: &Value, path: &str) -> String {
    let found = path.split('.').try_fold(object, |v, k| v.get(k));
    found
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn selected(object: &Value, selector: &[(String, String)]) -> bool {
    selector.iter().all(|(k, v)| field(object, k) == *v)
}

/// A `Status` as the API reports a failed request.
fn status(code: u16, message: &str) -> Value {
    let reason = match code {
        404 => "NotFound",
        409 if message.contains("already exists") => "AlreadyExists",
        409 => "Conflict",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    };
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
}

/// Fields whose lists a strategic merge patch merges by a key (as far as the agent patches).
const MERGE_KEYS: [(&str, &str); 2] = [("conditions", "type"), ("addresses", "type")];

/// A strategic merge patch: a merge patch whose keyed lists merge element by element.
fn strategic_merge(target: &mut Value, patch: &Value) {
    let (Some(target_map), Some(patch_map)) = (target.as_object_mut(), patch.as_object()) else {
        *target = patch.clone();
        return;
    };
    for (k, v) in patch_map {
        let key = MERGE_KEYS
            .iter()
            .find(|(f, _)| *f == k.as_str())
            .map(|(_, key)| *key);
        match (target_map.get_mut(k), v, key) {
            (_, Value::Null, _) => {
                target_map.remove(k);
            }
            (Some(Value::Array(have)), Value::Array(items), Some(key)) => {
                for item in items {
                    match have.iter_mut().find(|h| h.get(key) == item.get(key)) {
                        Some(h) => strategic_merge(h, item),
                        None => have.push(item.clone()),
                    }
                }
            }
            (Some(have), Value::Object(_), _) if have.is_object() => strategic_merge(have, v),
            _ => {
                target_map.insert(k.clone(), v.clone());
            }
        }
    }
}

fn once(code: u16, body: &Value) -> http::Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(body).expect("JSON"));
    let stream = futures::stream::once(async move { Ok(Frame::data(bytes)) }).boxed();
    response(code, StreamBody::new(stream))
}

fn response(code: u16, body: Body) -> http::Response<Body> {
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(body)
        .expect("response")
}

fn line(event: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(event).expect("JSON");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

impl State {
    /// Stores `object` at (collection, name) with a new resourceVersion (and a UID when it has
    /// none) and tells the watches; `None` removes it. Returns what is stored (or was removed).
    fn write(&mut self, collection: &str, name: &str, object: Option<Value>) -> Option<Value> {
        self.version += 1;
        let key = (collection.to_string(), name.to_string());
        let (kind, object) = match object {
            Some(mut object) => {
                let meta = &mut object["metadata"];
                meta["name"] = name.into();
                meta["resourceVersion"] = self.version.to_string().into();
                if meta.get("uid").and_then(Value::as_str).is_none() {
                    meta["uid"] = format!("uid-{}", self.version).into();
                }
                if meta.get("creationTimestamp").is_none() {
                    meta["creationTimestamp"] = "2026-01-01T00:00:00Z".into();
                }
                let kind = if self.objects.contains_key(&key) {
                    "MODIFIED"
                } else {
                    "ADDED"
                };
                self.objects.insert(key, object.clone());
                (kind, object)
            }
            None => {
                let mut gone = self.objects.remove(&key)?;
                gone["metadata"]["resourceVersion"] = self.version.to_string().into();
                ("DELETED", gone)
            }
        };
        let event = json!({ "type": kind, "object": object });
        self.watches.retain(|w| {
            !within(collection, &w.collection)
                || !selected(&object, &w.selector)
                || w.tx.unbounded_send(line(&event)).is_ok()
        });
        self.history
            .push((self.version, collection.to_string(), event));
        Some(object)
    }

    fn list(&self, collection: &str, selector: &[(String, String)]) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((c, _), o)| within(c, collection) && selected(o, selector))
            .map(|(_, o)| o.clone())
            .collect()
    }

    fn answer(&mut self, request: &Request) -> http::Response<Body> {
        let failure = self
            .failures
            .iter_mut()
            .find(|f| f.times > 0 && f.method == request.method && f.path == request.path);
        if let Some(f) = failure {
            f.times -= 1;
            return once(f.code, &status(f.code, "injected failure"));
        }
        let query: BTreeMap<String, String> = form_urlencoded::parse(request.query.as_bytes())
            .into_owned()
            .collect();
        let selector: Vec<(String, String)> = query
            .get("fieldSelector")
            .into_iter()
            .flat_map(|s| s.split(','))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let Route {
            collection,
            name,
            sub,
        } = route(&request.path);
        let current = name
            .as_ref()
            .and_then(|n| self.objects.get(&(collection.clone(), n.clone())))
            .cloned();
        let not_found = || once(404, &status(404, &format!("{} not found", request.path)));
        let body = &request.body;
        match (request.method.as_str(), name, current) {
            ("GET", None, _) if query.get("watch").is_some_and(|w| w == "true") => {
                let from: u64 = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let (tx, rx) = mpsc::unbounded();
                for (_, _, event) in self.history.iter().filter(|(v, c, e)| {
                    *v > from && within(c, &collection) && selected(&e["object"], &selector)
                }) {
                    let _ = tx.unbounded_send(line(event));
                }
                self.watches.push(Watch {
                    collection,
                    selector,
                    tx,
                });
                response(200, StreamBody::new(rx.map(|b| Ok(Frame::data(b))).boxed()))
            }
            ("GET", None, _) => once(
                200,
                &json!({
                    "apiVersion": "v1", "kind": "List",
                    "metadata": { "resourceVersion": self.version.to_string() },
                    "items": self.list(&collection, &selector),
                }),
            ),
            ("GET", Some(_), Some(object)) => once(200, &object),
            ("POST", None, _) => {
                let name = field(body, "metadata.name");
                if self
                    .objects
                    .contains_key(&(collection.clone(), name.clone()))
                {
                    let message = format!("{name} already exists");
                    return once(409, &status(409, &message));
                }
                let made = self.write(&collection, &name, Some(body.clone()));
                once(201, &made.expect("written"))
            }
            (_, Some(_), None) => not_found(),
            ("PUT" | "PATCH", Some(name), Some(current)) => {
                let mut next = current.clone();
                match request.method.as_str() {
                    "PUT" => {
                        let version = field(body, "metadata.resourceVersion");
                        if !version.is_empty()
                            && version != field(&current, "metadata.resourceVersion")
                        {
                            return once(409, &status(409, "the object has been modified"));
                        }
                        next = body.clone();
                    }
                    _ if request.content_type.contains("strategic") => {
                        strategic_merge(&mut next, body)
                    }
                    _ => json_patch::merge(&mut next, body),
                }
                let uid = field(&next, "metadata.uid");
                if !uid.is_empty() && uid != field(&current, "metadata.uid") {
                    return once(409, &status(409, "Precondition failed: UID"));
                }
                next["metadata"]["uid"] = current["metadata"]["uid"].clone();
                if sub.as_deref() == Some("status") {
                    let status = next["status"].take();
                    next = current;
                    next["status"] = status;
                }
                let written = self.write(&collection, &name, Some(next));
                once(200, &written.expect("written"))
            }
            ("DELETE", Some(name), Some(current)) => {
                let uid = field(body, "preconditions.uid");
                if !uid.is_empty() && uid != field(&current, "metadata.uid") {
                    return once(409, &status(409, "Precondition failed: UID"));
                }
                let gone = self.write(&collection, &name, None);
                once(200, &gone.expect("removed"))
            }
            _ => once(405, &status(405, "method not allowed")),
        }
    }
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake API lock")
    }

    /// A client whose requests this server answers.
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let api = api.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let request = Request {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    content_type: parts
                        .headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string(),
                    body: serde_json::from_slice(&body).unwrap_or_default(),
                    code: 0,
                };
                let mut state = api.state();
                let response = state.answer(&request);
                let code = response.status().as_u16();
                state.requests.push(Request { code, ..request });
                Ok::<_, Infallible>(response)
            }
        });
        kube::Client::new(service, "default")
    }

    /// Stores `object` at `path` (an object's path), as another client would.
    pub fn put(&self, path: &str, object: Value) -> Value {
        let r = route(path);
        let name = r.name.expect("an object path");
        self.state()
            .write(&r.collection, &name, Some(object))
            .expect("written")
    }

    /// Changes the object at `path` in place, as another client would.
    pub fn edit(&self, path: &str, change: impl FnOnce(&mut Value)) {
        let mut object = self.get(path).expect("object to edit");
        change(&mut object);
        self.put(path, object);
    }

    /// Removes the object at `path`, as another client would.
    pub fn remove(&self, path: &str) {
        let r = route(path);
        let name = r.name.expect("an object path");
        self.state().write(&r.collection, &name, None);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        let r = route(path);
        let name = r.name.expect("an object path");
        self.state().objects.get(&(r.collection, name)).cloned()
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }

    /// The requests so far of `method` to `path`.
    pub fn requests_to(&self, method: &str, path: &str) -> Vec<Request> {
        let all = self.requests();
        all.into_iter()
            .filter(|r| r.method == method && r.path == path)
            .collect()
    }

    /// The next `times` requests of `method` to `path` fail with `code`.
    pub fn fail(&self, method: &str, path: &str, times: usize, code: u16) {
        self.state().failures.push(Failure {
            method: method.into(),
            path: path.into(),
            times,
            code,
        });
    }
}

/// Sleeps in steps of 100 ms (paused time moves on by itself) until `done` holds; panics after
/// `within`, a bound that only catches a hang.
pub(super) async fn until(what: &str, within: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_as_the_api_routes_them() {
        let r = route("/api/v1/namespaces/default/pods/web/status");
        assert_eq!(r.collection, "/api/v1/namespaces/default/pods");
        assert_eq!(
            (r.name.as_deref(), r.sub.as_deref()),
            (Some("web"), Some("status"))
        );
        let r = route("/apis/storage.k8s.io/v1/csinodes");
        assert_eq!(r.collection, "/apis/storage.k8s.io/v1/csinodes");
        assert!(r.name.is_none());
        assert!(within("/api/v1/namespaces/x/pods", "/api/v1/pods"));
        assert!(within(
            "/api/v1/namespaces/x/pods",
            "/api/v1/namespaces/x/pods"
        ));
        assert!(!within(
            "/api/v1/namespaces/x/pods",
            "/api/v1/namespaces/y/pods"
        ));
        assert!(!within("/api/v1/namespaces/x/secrets", "/api/v1/pods"));
        let r = route("/api/v1/nodes/n1");
        assert_eq!(
            (r.collection.as_str(), r.name.as_deref()),
            ("/api/v1/nodes", Some("n1"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_sees_changes_after_its_list() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let api = FakeApi::new();
        let path = "/api/v1/namespaces/default/configmaps/cfg";
        api.put(path, json!({ "data": { "k": "1" } }));
        let configmaps: kube::Api<ConfigMap> = kube::Api::namespaced(api.client(), "default");
        let mut seen = std::pin::pin!(kube::runtime::watcher::watch_object(configmaps, "cfg"));
        let data =
            |cm: Option<ConfigMap>| cm.and_then(|c| c.data).and_then(|d| d.get("k").cloned());
        assert_eq!(
            data(seen.next().await.unwrap().unwrap()).as_deref(),
            Some("1")
        );
        api.edit(path, |cm| cm["data"]["k"] = "2".into());
        assert_eq!(
            data(seen.next().await.unwrap().unwrap()).as_deref(),
            Some("2")
        );
        api.remove(path);
        assert_eq!(data(seen.next().await.unwrap().unwrap()), None);
    }

    #[test]
    fn a_strategic_merge_patch_merges_conditions_by_type() {
        let mut node = json!({"status": {"conditions": [
            {"type": "Ready", "status": "False"}, {"type": "Other", "status": "True"}
        ], "capacity": {"cpu": "1"}}});
        strategic_merge(
            &mut node,
            &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        assert_eq!(
            node["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "Other", "status": "True"}])
        );
        assert_eq!(node["status"]["capacity"]["cpu"], "1");
    }
}
