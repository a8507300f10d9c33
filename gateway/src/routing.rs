//! Routing rules: which destinations a received object goes to.
//!
//! Owns the `[[route]]` rules of the config, compiled once at start. Invariants:
//! - an object goes to its listener's `route_to` plus the `to` of every rule it matches,
//!   each destination once, in config order;
//! - a rule matches when every criterion it gives matches (an empty list matches anything);
//!   criteria on the association (calling and called AE titles) never match an object from
//!   a link, and `peers` never match an object from a DICOM association;
//! - the rules decide from the origin (listener, AE titles, peer) and from two data set
//!   attributes found by the identity scan (SOP Class UID, Modality); they never read
//!   anything else of the object, so routing costs no extra parsing;
//! - the spool writes the object and the queue entries of all its destinations in one
//!   synced batch (fan-out is atomic); an object no rule takes and whose listener has no
//!   `route_to` is refused before anything is stored.

use std::sync::Arc;

use crate::config::{Config, Route};
use crate::spool::{RouteFacts, RouteFn};

/// Where an object came from.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The listener it arrived on.
    pub listener: String,
    /// Whether that is a link listener.
    pub link: bool,
    /// Calling AE title (DICOM).
    pub calling_ae: Option<String>,
    /// Called AE title (DICOM).
    pub called_ae: Option<String>,
    /// The peer gateway's node name (link).
    pub peer: Option<String>,
}

/// The compiled `[[route]]` rules.
#[derive(Debug, Clone, Default)]
pub struct Router {
    rules: Arc<Vec<Route>>,
}

/// How one rule judged one object, for `check --explain`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    /// The rule's name.
    pub route: String,
    /// Whether it matched.
    pub matched: bool,
    /// The first criterion that did not match, if any.
    pub reason: Option<String>,
    /// Its destinations.
    pub to: Vec<String>,
}

impl Router {
    /// The rules of `cfg` (already validated by [`Config::load`]).
    pub fn from_config(cfg: &Config) -> Router {
        Router {
            rules: Arc::new(cfg.route.clone()),
        }
    }

    /// The function the spool applies once the data set's SOP class and modality are
    /// known, for objects from `origin`; `None` when no rule can match that origin (the
    /// listener's `route_to` alone decides).
    pub fn for_origin(&self, origin: Origin) -> Option<RouteFn> {
        let rules: Vec<Route> = self
            .rules
            .iter()
            .filter(|r| origin_mismatch(r, &origin).is_none())
            .cloned()
            .collect();
        if rules.is_empty() {
            return None;
        }
        Some(Arc::new(move |facts: &RouteFacts<'_>| {
            let mut out: Vec<String> = Vec::new();
            for r in &rules {
                if object_mismatch(r, facts).is_none() {
                    for d in &r.to {
                        if !out.contains(d) {
                            out.push(d.clone());
                        }
                    }
                }
            }
            out
        }))
    }

    /// Each rule's verdict on an object from `origin` with `facts`.
    pub fn explain(&self, origin: &Origin, facts: &RouteFacts<'_>) -> Vec<Verdict> {
        self.rules
            .iter()
            .map(|r| {
                let reason = origin_mismatch(r, origin).or_else(|| object_mismatch(r, facts));
                Verdict {
                    route: r.name.clone(),
                    matched: reason.is_none(),
                    reason,
                    to: r.to.clone(),
                }
            })
            .collect()
    }
}

fn listed(list: &[String], value: Option<&str>) -> bool {
    list.is_empty() || value.is_some_and(|v| list.iter().any(|x| x == v))
}

/// Why `r` cannot match objects from `o`, if it cannot.
fn origin_mismatch(r: &Route, o: &Origin) -> Option<String> {
    if !r.can_match(&o.listener, o.link) {
        return Some(
            if r.listeners.is_empty() || r.listeners.contains(&o.listener) {
                if o.link {
                    "AE title criteria never match a link".into()
                } else {
                    "peer criteria never match a DICOM association".into()
                }
            } else {
                format!("listener {} is not in listeners", o.listener)
            },
        );
    }
    if !listed(&r.calling_ae_titles, o.calling_ae.as_deref()) {
        return Some("calling AE title not in calling_ae_titles".into());
    }
    if !listed(&r.called_ae_titles, o.called_ae.as_deref()) {
        return Some("called AE title not in called_ae_titles".into());
    }
    if !listed(&r.peers, o.peer.as_deref()) {
        return Some("peer not in peers".into());
    }
    None
}

/// Why `r` does not take an object with `facts`, if it does not.
fn object_mismatch(r: &Route, f: &RouteFacts<'_>) -> Option<String> {
    if !listed(&r.modalities, f.modality) {
        return Some(match f.modality {
            Some(m) => format!("modality {m} not in modalities"),
            None => "the data set has no modality".into(),
        });
    }
    if !listed(&r.sop_classes, Some(f.sop_class)) {
        return Some("SOP class not in sop_classes".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, f: impl FnOnce(&mut Route)) -> Route {
        let mut r = Route {
            name: name.into(),
            listeners: vec![],
            calling_ae_titles: vec![],
            called_ae_titles: vec![],
            peers: vec![],
            modalities: vec![],
            sop_classes: vec![],
            to: vec![format!("{name}-dest")],
        };
        f(&mut r);
        r
    }

    fn router(rules: Vec<Route>) -> Router {
        Router {
            rules: Arc::new(rules),
        }
    }

    fn lan(calling: &str) -> Origin {
        Origin {
            listener: "lan".into(),
            link: false,
            calling_ae: Some(calling.into()),
            called_ae: Some("GW".into()),
            peer: None,
        }
    }

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const MR: &str = "1.2.840.10008.5.1.4.1.1.4";

    #[test]
    fn every_criterion_must_match_and_destinations_are_unique_in_order() {
        let r = router(vec![
            rule("ct", |r| r.modalities = vec!["CT".into()]),
            rule("scanner", |r| {
                r.calling_ae_titles = vec!["SCANNER".into()];
                r.to = vec!["ct-dest".into(), "archive".into()];
            }),
            rule("mr-class", |r| r.sop_classes = vec![MR.into()]),
            rule("from-link", |r| r.peers = vec!["site-a".into()]),
        ]);
        let f = r.for_origin(lan("SCANNER")).expect("rules apply");
        let ct = RouteFacts {
            sop_class: CT,
            modality: Some("CT"),
        };
        assert_eq!(f(&ct), vec!["ct-dest".to_string(), "archive".into()]);
        let mr = RouteFacts {
            sop_class: MR,
            modality: Some("MR"),
        };
        assert_eq!(
            f(&mr),
            vec![
                "ct-dest".to_string(),
                "archive".into(),
                "mr-class-dest".into()
            ]
        );
        let other = r.for_origin(lan("OTHER")).expect("rules apply");
        assert!(
            other(&RouteFacts {
                sop_class: CT,
                modality: None
            })
            .is_empty()
        );
    }

    #[test]
    fn association_criteria_never_match_a_link_and_peers_never_a_dicom_listener() {
        let r = router(vec![
            rule("ae", |r| r.calling_ae_titles = vec!["X".into()]),
            rule("peer", |r| r.peers = vec!["site-a".into()]),
        ]);
        let link = Origin {
            listener: "wan".into(),
            link: true,
            peer: Some("site-a".into()),
            ..Origin::default()
        };
        let v = r.explain(
            &link,
            &RouteFacts {
                sop_class: CT,
                modality: None,
            },
        );
        assert!(
            !v[0].matched && v[0].reason.as_deref() == Some("AE title criteria never match a link")
        );
        assert!(v[1].matched, "{v:?}");
        let v = r.explain(
            &lan("X"),
            &RouteFacts {
                sop_class: CT,
                modality: None,
            },
        );
        assert!(v[0].matched && !v[1].matched, "{v:?}");
    }

    #[test]
    fn a_listener_no_rule_can_match_has_no_route_function() {
        let r = router(vec![rule("wan-only", |r| r.listeners = vec!["wan".into()])]);
        assert!(r.for_origin(lan("X")).is_none());
    }
}
