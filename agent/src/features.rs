//! Feature gates, as the kubelet takes them (`--feature-gates Name=true,…`, `featureGates` in
//! the config file), and the node's declared features they give (`node.status.declaredFeatures`,
//! which the API server reads to choose how it reaches the node).
//!
//! Only the gates nodelet implements mean anything; any other name (a kubelet gate nodelet has
//! no use for, or a typo) is reported by [`FeatureGates::resolve`] as a warning naming it.

use std::collections::BTreeMap;

/// The API server passes a client's WebSocket for exec, attach and port-forward straight to a
/// node that declares this feature, instead of translating it to SPDY.
pub const EXTEND_WEBSOCKETS_TO_KUBELET: &str = "ExtendWebSocketsToKubelet";
/// The node reports its declared features in its status (the kubelet's gate of that name).
pub const NODE_DECLARED_FEATURES: &str = "NodeDeclaredFeatures";

/// The gates nodelet implements and their defaults (those of the kubelet at 1.36).
const KNOWN: &[(&str, bool)] = &[
    (EXTEND_WEBSOCKETS_TO_KUBELET, true),
    (NODE_DECLARED_FEATURES, true),
];

/// The features a node may declare, each with the gate that enables it.
const DECLARABLE: &[&str] = &[EXTEND_WEBSOCKETS_TO_KUBELET];

/// Whether each gate nodelet implements is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureGates {
    enabled: BTreeMap<&'static str, bool>,
}

impl Default for FeatureGates {
    fn default() -> Self {
        FeatureGates {
            enabled: KNOWN.iter().copied().collect(),
        }
    }
}

impl FeatureGates {
    /// The defaults overridden by `set` (the file's gates with the flag's over them), and a
    /// warning for each name nodelet does not implement.
    pub fn resolve(set: &BTreeMap<String, bool>) -> (Self, Vec<String>) {
        let mut gates = FeatureGates::default();
        let mut warnings = Vec::new();
        for (name, on) in set {
            match KNOWN.iter().find(|(known, _)| known == name) {
                Some((known, _)) => {
                    gates.enabled.insert(known, *on);
                }
                None => warnings.push(format!(
                    "feature gate {name} is not one nodelet implements ({}); it is ignored",
                    KNOWN.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
                )),
            }
        }
        (gates, warnings)
    }

    pub fn enabled(&self, name: &str) -> bool {
        self.enabled.get(name).copied().unwrap_or(false)
    }

    /// What the node declares in `status.declaredFeatures`, sorted: nothing while
    /// `NodeDeclaredFeatures` is off, else each declarable feature whose gate is on.
    pub fn declared_features(&self) -> Vec<String> {
        if !self.enabled(NODE_DECLARED_FEATURES) {
            return Vec::new();
        }
        let mut features: Vec<String> = DECLARABLE
            .iter()
            .filter(|f| self.enabled(f))
            .map(|f| f.to_string())
            .collect();
        features.sort();
        features
    }
}

/// One `--feature-gates` item, `Name=bool`, with the booleans Go's `strconv.ParseBool` takes.
pub fn parse_gate(item: &str) -> Result<(String, bool), String> {
    let (name, value) = item
        .split_once('=')
        .ok_or_else(|| format!("{item:?}: missing bool value for the gate (Name=true)"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{item:?}: missing the gate's name"));
    }
    let on = match value.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
        "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
        other => return Err(format!("{item:?}: invalid value {other:?} (true or false)")),
    };
    Ok((name.to_string(), on))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, bool)]) -> BTreeMap<String, bool> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn the_websocket_feature_is_declared_by_default_and_gated_as_the_kubelet() {
        let (gates, warnings) = FeatureGates::resolve(&BTreeMap::new());
        assert!(warnings.is_empty());
        assert_eq!(gates.declared_features(), [EXTEND_WEBSOCKETS_TO_KUBELET]);
        let (off, _) = FeatureGates::resolve(&set(&[(EXTEND_WEBSOCKETS_TO_KUBELET, false)]));
        assert!(off.declared_features().is_empty());
        assert!(!off.enabled(EXTEND_WEBSOCKETS_TO_KUBELET));
        let (undeclared, _) = FeatureGates::resolve(&set(&[(NODE_DECLARED_FEATURES, false)]));
        assert!(undeclared.declared_features().is_empty());
        assert!(undeclared.enabled(EXTEND_WEBSOCKETS_TO_KUBELET));
    }

    #[test]
    fn a_gate_nodelet_does_not_implement_is_a_warning_naming_it() {
        let (gates, warnings) = FeatureGates::resolve(&set(&[("InPlacePodVerticalScaling", true)]));
        assert_eq!(gates, FeatureGates::default());
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("InPlacePodVerticalScaling"),
            "{warnings:?}"
        );
    }

    #[test]
    fn gate_items_parse_as_the_kubelet_reads_them() {
        assert_eq!(parse_gate("A=true"), Ok(("A".into(), true)));
        assert_eq!(parse_gate(" A = False "), Ok(("A".into(), false)));
        assert_eq!(parse_gate("A=0"), Ok(("A".into(), false)));
        assert!(parse_gate("A").unwrap_err().contains("missing bool"));
        assert!(parse_gate("A=yes").unwrap_err().contains("invalid value"));
        assert!(parse_gate("=true").unwrap_err().contains("name"));
    }
}
