//! Label selectors (`metav1.LabelSelector`) and their matching.
//!
//! ```text
//!  matchLabels + matchExpressions ──► Selector { requirements } ──► matches(&Labels) -> bool
//! ```
//!
//! "The requirements are ANDed." matchLabels `{k: v}` is the same as the expression
//! `k In [v]`, so both become one list of requirements. "An empty label selector matches
//! all objects."

use std::fmt;

use crate::policy::model::Labels;

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// Exactly as many as there are (a `Vec` pushed to keeps room for 4: at 1 000 policies
    /// that slack was 0.5 MB of the agent's heap).
    requirements: Box<[Requirement]>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    /// The label is present and its value is one of these (never empty).
    In(Values),
    /// The label is absent, or its value is none of these (never empty).
    NotIn(Values),
    Exists,
    DoesNotExist,
}

/// The values of an `In`/`NotIn` requirement: sorted, without duplicates, in one
/// allocation of exactly their size. Every `matchLabels` entry is a one-value `In`, and a
/// one-value `BTreeSet` costs a whole B-tree leaf (~280 bytes): at 1 000 policies that was
/// 0.7 MB of the agent's heap (massif, `benches/README.md`).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Values(Box<[String]>);

/// As the `BTreeSet` it replaced printed: set names are hashed from this text
/// ([`crate::compile::naming`]), so it must not change.
impl fmt::Debug for Values {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

impl Values {
    pub fn contains(&self, value: &str) -> bool {
        self.0.binary_search_by(|v| v.as_str().cmp(value)).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In ascending order.
    pub fn iter(&self) -> std::slice::Iter<'_, String> {
        self.0.iter()
    }
}

impl FromIterator<String> for Values {
    fn from_iter<I: IntoIterator<Item = String>>(values: I) -> Self {
        let mut values: Vec<String> = values.into_iter().collect();
        values.sort_unstable();
        values.dedup();
        Values(values.into_boxed_slice())
    }
}

impl<const N: usize> From<[String; N]> for Values {
    fn from(values: [String; N]) -> Self {
        values.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Values {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Selector {
    /// The empty selector, which matches everything.
    pub fn everything() -> Self {
        Selector::default()
    }

    /// Builds a selector; requirements are sorted and deduplicated so that equal selectors
    /// compare (and hash) equal however they were written.
    pub fn new(mut requirements: Vec<Requirement>) -> Self {
        requirements.sort();
        requirements.dedup();
        Selector { requirements: requirements.into_boxed_slice() }
    }

    /// `matchLabels` only.
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Selector::new(
            labels
                .into_iter()
                .map(|(k, v)| Requirement { key: k.to_string(), operator: Operator::In(Values::from([v.to_string()])) })
                .collect(),
        )
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.operator {
            Operator::In(values) => value.is_some_and(|v| values.contains(v)),
            Operator::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl fmt::Display for Selector {
    /// The `kubectl` selector syntax: `a=b,c in (d,e),!f`; `{}` (everything) prints as `<all>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("<all>");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let join = |vs: &Values| vs.iter().cloned().collect::<Vec<_>>().join(",");
            match &r.operator {
                Operator::In(vs) if vs.len() == 1 => write!(f, "{}={}", r.key, join(vs))?,
                Operator::In(vs) => write!(f, "{} in ({})", r.key, join(vs))?,
                Operator::NotIn(vs) => write!(f, "{} notin ({})", r.key, join(vs))?,
                Operator::Exists => write!(f, "{}", r.key)?,
                Operator::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn req(key: &str, operator: Operator) -> Requirement {
        Requirement { key: key.to_string(), operator }
    }

    fn set(values: &[&str]) -> Values {
        values.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn an_empty_selector_matches_pods_without_labels() {
        assert!(Selector::everything().matches(&Labels::new()));
    }

    #[test]
    fn not_in_matches_a_pod_that_lacks_the_key() {
        let s = Selector::new(vec![req("tier", Operator::NotIn(set(&["db"])))]);
        assert!(s.matches(&labels(&[("app", "x")])));
        assert!(!s.matches(&labels(&[("tier", "db")])));
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let mut reqs = vec![req("env", Operator::Exists)];
        reqs.extend(Selector::from_labels([("app", "web")]).requirements().iter().cloned());
        let s = Selector::new(reqs);
        assert!(s.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
    }

    #[test]
    fn selectors_written_in_different_orders_are_equal() {
        let a = Selector::from_labels([("a", "1"), ("b", "2")]);
        let b = Selector::new(vec![req("b", Operator::In(set(&["2"]))), req("a", Operator::In(set(&["1"])))]);
        assert_eq!(a, b);
    }

    // --- property test against a deliberately naive reference ------------------------------

    /// The naive reference: the Kubernetes documentation, read literally, one case at a time.
    #[derive(Clone, Debug)]
    struct NaiveSelector {
        match_labels: Vec<(String, String)>,
        expressions: Vec<(String, &'static str, Vec<String>)>,
    }

    fn naive_matches(s: &NaiveSelector, labels: &BTreeMap<String, String>) -> bool {
        for (k, v) in &s.match_labels {
            if labels.get(k) != Some(v) {
                return false;
            }
        }
        for (k, op, values) in &s.expressions {
            let ok = match *op {
                "In" => labels.contains_key(k) && values.contains(&labels[k]),
                "NotIn" => !labels.contains_key(k) || !values.contains(&labels[k]),
                "Exists" => labels.contains_key(k),
                "DoesNotExist" => !labels.contains_key(k),
                _ => unreachable!(),
            };
            if !ok {
                return false;
            }
        }
        true
    }

    fn to_selector(s: &NaiveSelector) -> Selector {
        let mut reqs: Vec<Requirement> =
            s.match_labels.iter().map(|(k, v)| req(k, Operator::In(Values::from([v.clone()])))).collect();
        for (k, op, values) in &s.expressions {
            let values: Values = values.iter().cloned().collect();
            reqs.push(req(
                k,
                match *op {
                    "In" => Operator::In(values),
                    "NotIn" => Operator::NotIn(values),
                    "Exists" => Operator::Exists,
                    _ => Operator::DoesNotExist,
                },
            ));
        }
        Selector::new(reqs)
    }

    // A tiny vocabulary makes collisions (and so both outcomes) frequent.
    fn key() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["app", "tier", "env", "example.com/team"]).prop_map(String::from)
    }
    fn value() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["web", "db", "prod", ""]).prop_map(String::from)
    }
    fn naive_selector() -> impl Strategy<Value = NaiveSelector> {
        let expr = (
            key(),
            prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]),
            prop::collection::vec(value(), 1..3),
        )
            .prop_map(|(k, op, vs)| if op == "Exists" || op == "DoesNotExist" { (k, op, vec![]) } else { (k, op, vs) });
        (prop::collection::vec((key(), value()), 0..3), prop::collection::vec(expr, 0..3))
            .prop_map(|(match_labels, expressions)| NaiveSelector { match_labels, expressions })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn selector_matching_agrees_with_the_naive_reading(
            s in naive_selector(),
            l in prop::collection::btree_map(key(), value(), 0..4),
        ) {
            prop_assert_eq!(to_selector(&s).matches(&l), naive_matches(&s, &l));
        }

        #[test]
        fn an_empty_selector_matches_any_labels(l in prop::collection::btree_map(key(), value(), 0..4)) {
            prop_assert!(Selector::everything().matches(&l));
        }
    }
}
