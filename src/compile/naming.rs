//! Set identity: what a generated set holds, encoded canonically, and the names that
//! encoding gets, collisions resolved.
//!
//! ```text
//!  Selector / Peer / NamespaceScope / IpBlock ──► canonical text (injective, by hand)
//!        identity parts ──► Ident { key (all parts, injective), plain name (hash of the parts) }
//!        Ident ──► Namer (one per compile) ──► the plain name, or, when another identity of
//!                  the same compile holds it already, a rehash with a salt
//! ```
//!
//! The canonical text of a value is, by design, exactly what `{:?}` printed for it when set
//! names were hashed from `Debug` output, for every value the model can hold from a valid
//! Kubernetes object (ASCII labels): set names, and so the golden rulesets, did not change.
//! It is written out here, not derived: a change to a type's `Debug` (a field renamed, a
//! derive replaced) cannot change a name. Strings are quoted, `"` and `\` escaped (with the
//! ASCII control characters, as `Debug` does), so the encoding stays injective for any
//! string: two different selectors never share a canonical text.
//!
//! A name keeps [`crate::nft::names::HASH_LEN`] hex digits of hash: 48 bits, fewer in tests
//! ([`Namer::with_hash_bits`]). Two identities whose hashes collide would have become one
//! set; the [`Namer`] of a compile gives the first identity to claim a name (in the
//! compiler's walk order, which is deterministic: policies in cluster order, rules in order)
//! the plain name and the next one a rehash of its identity with a salt, at full width.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt::Write;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use crate::nft::names;
use crate::policy::model::{IpBlock, NamespaceScope, Peer};
use crate::policy::selector::{Operator, Selector};

/// A quoted string: `"` and `\` escaped, ASCII control characters as `\t`, `\r`, `\n`, `\0`
/// or `\u{..}`; everything else as is.
pub fn string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\0' => out.push_str("\\0"),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `Selector { requirements: [Requirement { key: "app", operator: In({"web"}) }, ...] }`.
pub fn selector(out: &mut String, s: &Selector) {
    out.push_str("Selector { requirements: [");
    for (i, r) in s.requirements().iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str("Requirement { key: ");
        string(out, &r.key);
        out.push_str(", operator: ");
        let values = |out: &mut String, word: &str, values: &crate::policy::selector::Values| {
            out.push_str(word);
            out.push_str("({");
            for (k, v) in values.iter().enumerate() {
                if k > 0 {
                    out.push_str(", ");
                }
                string(out, v);
            }
            out.push_str("})");
        };
        match &r.operator {
            Operator::In(vs) => values(out, "In", vs),
            Operator::NotIn(vs) => values(out, "NotIn", vs),
            Operator::Exists => out.push_str("Exists"),
            Operator::DoesNotExist => out.push_str("DoesNotExist"),
        }
        out.push_str(" }");
    }
    out.push_str("] }");
}

/// `PolicyNamespace`, or `Matching(<selector>)`.
pub fn namespace_scope(out: &mut String, scope: &NamespaceScope) {
    match scope {
        NamespaceScope::PolicyNamespace => out.push_str("PolicyNamespace"),
        NamespaceScope::Matching(s) => {
            out.push_str("Matching(");
            selector(out, s);
            out.push(')');
        }
    }
}

/// `10.0.0.0/8` or `2001:db8::/32`: the prefix as `ipnet` writes it (injective: an IPv6
/// prefix always holds a `:`, an IPv4 one never).
fn net(out: &mut String, n: &ipnet::IpNet) {
    let _ = write!(out, "{n}");
}

/// `IpBlock { cidr: 10.0.0.0/8, except: [10.1.0.0/16] }`.
pub fn ip_block(out: &mut String, b: &IpBlock) {
    out.push_str("IpBlock { cidr: ");
    net(out, &b.cidr);
    out.push_str(", except: [");
    for (i, e) in b.except.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        net(out, e);
    }
    out.push_str("] }");
}

/// `Pods { namespaces: <scope>, pods: <selector> }` or `IpBlock(<ip block>)`.
pub fn peer(out: &mut String, p: &Peer) {
    match p {
        Peer::Pods { namespaces, pods } => {
            out.push_str("Pods { namespaces: ");
            namespace_scope(out, namespaces);
            out.push_str(", pods: ");
            selector(out, pods);
            out.push_str(" }");
        }
        Peer::IpBlock(b) => {
            out.push_str("IpBlock(");
            ip_block(out, b);
            out.push(')');
        }
    }
}

/// `[<peer>, <peer>]`.
pub fn peers(out: &mut String, ps: &[Peer]) {
    out.push('[');
    for (i, p) in ps.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        peer(out, p);
    }
    out.push(']');
}

/// The canonical text of `value` written by `encode`.
pub fn text<T: ?Sized>(value: &T, encode: fn(&mut String, &T)) -> String {
    let mut out = String::new();
    encode(&mut out, value);
    out
}

/// A text with its hash, computed once: a map key that costs one `u64` to hash and,
/// between two clones of the same text, a pointer comparison to compare. Identities and
/// names are looked up on every compile for every set a reused chain names.
#[derive(Clone, Debug)]
pub struct Hashed {
    hash: u64,
    text: Arc<str>,
}

impl Hashed {
    fn new(text: String) -> Self {
        Hashed { hash: names::stable_hash(&[&text]), text: text.into() }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Hashed {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && (Arc::ptr_eq(&self.text, &other.text) || self.text == other.text)
    }
}

impl Eq for Hashed {}

impl std::hash::Hash for Hashed {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for Hashed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Hashed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

/// The hasher of [`HashedMap`]: a [`Hashed`]'s hash as it is (already mixed).
#[derive(Default)]
pub struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map by [`Hashed`].
pub type HashedMap<V> = HashMap<Hashed, V, BuildHasherDefault<PassThrough>>;

/// The identity of one generated object: its prefix, every part of what it holds (the key
/// the set cache uses: injective, so two different sets never share it) and the name it
/// gets when nothing else of its compile claims that name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ident {
    prefix: &'static str,
    key: Hashed,
    plain: Hashed,
}

impl Ident {
    /// The cache key: the prefix and each part, length-prefixed.
    pub fn key(&self) -> &Hashed {
        &self.key
    }

    /// The name it gets without a collision.
    pub fn plain(&self) -> &str {
        self.plain.as_str()
    }
}

/// Gives each identity of one compile its own name. Start each compile with
/// [`Namer::fresh`]: names are decided by the identities one ruleset holds, never by an
/// earlier compile's.
#[derive(Clone, Debug)]
pub struct Namer {
    bits: u32,
    /// The identity holding each name given so far.
    owners: HashedMap<Hashed>,
}

impl Default for Namer {
    fn default() -> Self {
        Namer::new()
    }
}

impl Namer {
    /// Hash bits of a name: all of [`names::HASH_LEN`] hex digits.
    pub const DEFAULT_BITS: u32 = 4 * names::HASH_LEN as u32;

    pub fn new() -> Self {
        Namer::with_hash_bits(Namer::DEFAULT_BITS)
    }

    /// A namer whose plain names keep only `bits` (1 to 48) bits of hash: for tests that
    /// need collisions (salted names always keep 48).
    pub fn with_hash_bits(bits: u32) -> Self {
        assert!((1..=Namer::DEFAULT_BITS).contains(&bits), "hash bits {bits} out of 1..=48");
        Namer { bits, owners: HashedMap::default() }
    }

    pub fn hash_bits(&self) -> u32 {
        self.bits
    }

    /// A namer of the same width that has given no name yet, with room for `names`.
    pub fn fresh(&self, names: usize) -> Namer {
        Namer { bits: self.bits, owners: HashedMap::with_capacity_and_hasher(names, Default::default()) }
    }

    /// How many names it gave.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// The identity made of `parts` under `prefix`, named after `hint` (sanitised).
    pub fn ident(&self, prefix: &'static str, parts: &[&str], hint: &str) -> Ident {
        let mut key = String::with_capacity(prefix.len() + parts.iter().map(|p| p.len() + 4).sum::<usize>());
        key.push_str(prefix);
        for part in parts {
            let _ = write!(key, "{}:", part.len());
            key.push_str(part);
        }
        let plain = names::generated_with_bits(prefix, parts, hint, self.bits);
        Ident { prefix, key: Hashed::new(key), plain: Hashed::new(plain) }
    }

    /// The name of `ident` in this compile: its plain name unless another identity holds
    /// it, else the first free salted name (`<prefix><48-bit hash of key and salt><hint>`).
    pub fn name(&mut self, ident: &Ident) -> String {
        if self.holds_plain(ident) {
            return ident.plain().to_string();
        }
        self.claim(ident).as_str().to_string()
    }

    /// Whether `ident` is named `name` in this compile (claiming its name, as
    /// [`Namer::name`]). A reused chain asks this of each of its sets on every compile:
    /// when the identity holds its plain name already, it costs one lookup.
    pub fn names_as(&mut self, ident: &Ident, name: &str) -> bool {
        if self.holds_plain(ident) {
            return ident.plain() == name;
        }
        self.claim(ident).as_str() == name
    }

    /// Whether `ident` was given its plain name already.
    fn holds_plain(&self, ident: &Ident) -> bool {
        self.owners.get(&ident.plain).is_some_and(|owner| *owner == ident.key)
    }

    fn claim(&mut self, ident: &Ident) -> Hashed {
        let mut salt = 0u32;
        loop {
            let name = if salt == 0 {
                ident.plain.clone()
            } else {
                let hash = names::stable_hash(&[ident.key.as_str(), &salt.to_string()]) >> (64 - Namer::DEFAULT_BITS);
                let suffix = &ident.plain()[ident.prefix.len() + names::HASH_LEN..];
                Hashed::new(format!("{}{hash:0width$x}{suffix}", ident.prefix, width = names::HASH_LEN))
            };
            match self.owners.entry(name) {
                Entry::Vacant(vacant) => {
                    let name = vacant.key().clone();
                    vacant.insert(ident.key.clone());
                    return name;
                }
                Entry::Occupied(owner) if *owner.get() == ident.key => return owner.key().clone(),
                Entry::Occupied(_) => salt += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::selector::Requirement;
    use std::collections::BTreeSet;

    fn sel(reqs: Vec<(&str, Operator)>) -> Selector {
        Selector::new(reqs.into_iter().map(|(k, operator)| Requirement { key: k.into(), operator }).collect())
    }

    fn values(vs: &[&str]) -> crate::policy::selector::Values {
        vs.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn the_canonical_text_of_a_few_values_is_pinned() {
        assert_eq!(text(&Selector::everything(), selector), "Selector { requirements: [] }");
        let s = sel(vec![("app", Operator::In(values(&["web", "api"]))), ("tier", Operator::DoesNotExist)]);
        assert_eq!(
            text(&s, selector),
            r#"Selector { requirements: [Requirement { key: "app", operator: In({"api", "web"}) }, Requirement { key: "tier", operator: DoesNotExist }] }"#
        );
        let ps = vec![
            Peer::Pods { namespaces: NamespaceScope::PolicyNamespace, pods: sel(vec![("a", Operator::Exists)]) },
            Peer::Pods {
                namespaces: NamespaceScope::Matching(sel(vec![("ns", Operator::NotIn(values(&["x"])))])),
                pods: Selector::everything(),
            },
            Peer::IpBlock(IpBlock {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: vec!["10.1.0.0/16".parse().unwrap(), "10.2.0.0/16".parse().unwrap()],
            }),
            Peer::IpBlock(IpBlock { cidr: "2001:db8::/32".parse().unwrap(), except: vec![] }),
        ];
        assert_eq!(
            text(ps.as_slice(), peers),
            concat!(
                r#"[Pods { namespaces: PolicyNamespace, pods: Selector { requirements: [Requirement { key: "a", operator: Exists }] } }, "#,
                r#"Pods { namespaces: Matching(Selector { requirements: [Requirement { key: "ns", operator: NotIn({"x"}) }] }), pods: Selector { requirements: [] } }, "#,
                r#"IpBlock(IpBlock { cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.2.0.0/16] }), "#,
                r#"IpBlock(IpBlock { cidr: 2001:db8::/32, except: [] })]"#
            )
        );
        let mut quoted = String::new();
        string(&mut quoted, "a\"b\\c\n\u{1}é");
        assert_eq!(quoted, r#""a\"b\\c\n\u{1}é""#);
    }

    /// The names of the sets the goldens hold were hashed from `Debug`: the encoding must
    /// still print exactly that for the values a cluster holds (ASCII strings).
    #[test]
    fn the_canonical_text_equals_the_debug_text_names_were_hashed_from() {
        for seed in 0..300 {
            let cluster = crate::cli::generate::small_random(seed);
            for policy in cluster.policies.iter() {
                for d in [crate::policy::model::Direction::Ingress, crate::policy::model::Direction::Egress] {
                    for rule in policy.rules(d).unwrap_or_default() {
                        let Some(ps) = &rule.peers else { continue };
                        assert_eq!(text(ps.as_slice(), peers), format!("{ps:?}"));
                        for p in ps {
                            if let Peer::Pods { namespaces, pods } = p {
                                assert_eq!(text(pods, selector), format!("{pods:?}"));
                                assert_eq!(text(namespaces, namespace_scope), format!("{namespaces:?}"));
                            }
                        }
                    }
                }
            }
        }
        let odd = "tab\tquote\"back\\slash\u{7f}'";
        let mut quoted = String::new();
        string(&mut quoted, odd);
        assert_eq!(quoted, format!("{odd:?}"));
    }

    #[test]
    fn two_identities_whose_plain_names_collide_get_different_names_the_first_keeping_its_own() {
        let namer = Namer::with_hash_bits(1);
        let idents: Vec<Ident> =
            (0..20).map(|i| namer.ident(names::PEERS_V4, &["x", &i.to_string()], "same")).collect();
        let mut namer = namer.fresh(0);
        let given: Vec<String> = idents.iter().map(|id| namer.name(id)).collect();
        let distinct: BTreeSet<&String> = given.iter().collect();
        assert_eq!(distinct.len(), idents.len(), "{given:?}");
        assert_eq!(given[0], idents[0].plain());
        // Asked again, in any order, each keeps its name.
        for (id, name) in idents.iter().zip(&given).rev() {
            assert_eq!(&namer.name(id), name);
        }
        assert!(given.iter().all(|n| names::is_ours(n)), "{given:?}");
    }

    #[test]
    fn a_full_width_namer_names_as_names_generated_always_did() {
        let namer = Namer::new();
        let id = namer.ident(names::PEERS_V6, &["ns", "a", "b"], "a_b");
        assert_eq!(id.plain(), names::generated(names::PEERS_V6, &["ns", "a", "b"], "a_b"));
        assert_eq!(namer.fresh(0).name(&id), id.plain());
    }
}
