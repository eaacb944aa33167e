//! SPIFFE ids: `spiffe://<trust-domain>/<path>`, validated exactly per the SPIFFE ID specification.
//!
//! Rules (SPIFFE-ID.md, section 2): the scheme is `spiffe` in lowercase followed by `://`; the trust
//! domain is non-empty and uses only lowercase letters, digits, `.`, `-` and `_` (so no port,
//! userinfo or uppercase); the path, if any, is `/`-separated segments that are non-empty, not
//! `.` or `..`, and use only letters, digits, `.`, `-` and `_` (so no percent-encoding, query or
//! fragment), with no trailing `/`; the whole id is at most 2048 bytes.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Longest SPIFFE id accepted, in bytes (SPIFFE ID specification).
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// A validated SPIFFE id. Cheap to clone (the text is shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The full id, e.g. `spiffe://cluster.local/ns/default/sa/sleep`.
    text: Arc<str>,
    /// Byte offset where the path starts (== text.len() when there is no path).
    path_start: usize,
}

/// What is wrong with a SPIFFE id, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE id {input:?}: {kind} (at byte {position})")]
pub struct SpiffeIdError {
    /// The rejected input (truncated to 200 characters).
    pub input: String,
    /// The rule broken.
    pub kind: SpiffeIdErrorKind,
    /// Byte offset in the input where the problem was found.
    pub position: usize,
}

/// The SPIFFE rule an id breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdErrorKind {
    /// The input is empty.
    #[error("empty")]
    Empty,
    /// It does not start with `spiffe://` (lowercase).
    #[error("the scheme must be \"spiffe://\" in lowercase")]
    Scheme,
    /// Nothing between `spiffe://` and the path.
    #[error("the trust domain is missing")]
    MissingTrustDomain,
    /// A character outside `[a-z0-9._-]` in the trust domain (uppercase, `:` for a port, `@` for
    /// userinfo, `?`, `#`, `%`, ...).
    #[error("trust domain characters are limited to lowercase letters, digits, '.', '-' and '_'")]
    TrustDomainChar,
    /// The trust domain is longer than 255 bytes.
    #[error("the trust domain is longer than 255 bytes")]
    TrustDomainTooLong,
    /// `//` or a leading empty segment.
    #[error("the path has an empty segment")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("the path has a '.' or '..' segment")]
    DotSegment,
    /// A character outside `[A-Za-z0-9._-]` in a path segment (`?` query, `#` fragment, `%`
    /// escapes and spaces included).
    #[error("path characters are limited to letters, digits, '.', '-' and '_'")]
    PathChar,
    /// The path ends with `/`.
    #[error("the path has a trailing '/'")]
    TrailingSlash,
    /// Longer than 2048 bytes.
    #[error("longer than 2048 bytes")]
    TooLong,
    /// Not of the Istio form `ns/<namespace>/sa/<service-account>`.
    #[error("not of the Istio form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    NotIstioForm,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE id.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        let fail = |kind, position| {
            Err(SpiffeIdError {
                input: input.chars().take(200).collect(),
                kind,
                position,
            })
        };
        if input.is_empty() {
            return fail(SpiffeIdErrorKind::Empty, 0);
        }
        if input.len() > MAX_ID_LEN {
            return fail(SpiffeIdErrorKind::TooLong, MAX_ID_LEN);
        }
        let Some(rest) = input.strip_prefix(SCHEME) else {
            return fail(SpiffeIdErrorKind::Scheme, 0);
        };
        let td_end = rest.find('/').unwrap_or(rest.len());
        let trust_domain = &rest[..td_end];
        if trust_domain.is_empty() {
            return fail(SpiffeIdErrorKind::MissingTrustDomain, SCHEME.len());
        }
        if let Some(i) = trust_domain.bytes().position(|b| !is_trust_domain_char(b)) {
            return fail(SpiffeIdErrorKind::TrustDomainChar, SCHEME.len() + i);
        }
        if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
            return fail(SpiffeIdErrorKind::TrustDomainTooLong, SCHEME.len());
        }
        let path_start = SCHEME.len() + td_end;
        if let Err((kind, at)) = validate_path(&input[path_start..]) {
            return fail(kind, path_start + at);
        }
        Ok(SpiffeId {
            text: Arc::from(input),
            path_start,
        })
    }

    /// Builds the Istio form `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn istio(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The whole id, `spiffe://...`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.text[SCHEME.len()..self.path_start]
    }

    /// The path, with its leading `/`, or `""` for a trust-domain id.
    pub fn path(&self) -> &str {
        &self.text[self.path_start..]
    }

    /// The id without `spiffe://`, as Istio writes principals in policies
    /// (`cluster.local/ns/default/sa/sleep`).
    pub fn principal(&self) -> &str {
        &self.text[SCHEME.len()..]
    }

    /// The namespace of an Istio-form id (`/ns/<ns>/sa/<sa>`), else `None`.
    pub fn namespace(&self) -> Option<&str> {
        self.istio_parts().map(|(ns, _)| ns)
    }

    /// The service account of an Istio-form id, else `None`.
    pub fn service_account(&self) -> Option<&str> {
        self.istio_parts().map(|(_, sa)| sa)
    }

    /// Requires the Istio form, returning `(namespace, service_account)`.
    pub fn require_istio(&self) -> Result<(&str, &str), SpiffeIdError> {
        self.istio_parts().ok_or_else(|| SpiffeIdError {
            input: self.text.chars().take(200).collect(),
            kind: SpiffeIdErrorKind::NotIstioForm,
            position: self.path_start,
        })
    }

    fn istio_parts(&self) -> Option<(&str, &str)> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

/// Body of the `spiffe_id` fuzz target, kept here so an ordinary test runs it over the seed
/// corpus. Checks: no panic; whatever is accepted prints back to itself and obeys the rules.
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub fn fuzz_spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match SpiffeId::parse(text) {
        Ok(id) => {
            assert_eq!(id.as_str(), text);
            assert!(text.len() <= MAX_ID_LEN);
            assert!(!id.trust_domain().is_empty());
            assert!(!id.path().ends_with('/'));
            assert_eq!(SpiffeId::parse(&format!("{id}")).as_ref(), Ok(&id));
            if let (Some(ns), Some(sa)) = (id.namespace(), id.service_account()) {
                let rebuilt = SpiffeId::istio(id.trust_domain(), ns, sa).expect("istio form");
                assert_eq!(rebuilt, id);
            }
        }
        Err(e) => assert!(e.position <= text.len().max(MAX_ID_LEN)),
    }
}

fn is_trust_domain_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// Validates a path (`""` or `/seg/seg`); on error returns the rule and the offset in `path`.
fn validate_path(path: &str) -> Result<(), (SpiffeIdErrorKind, usize)> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller split at the first '/', so `path` starts with one.
    let mut offset = 1;
    let body = &path[1..];
    if body.is_empty() {
        return Err((SpiffeIdErrorKind::TrailingSlash, 0));
    }
    let segments: Vec<&str> = body.split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            return Err(if i == last {
                (SpiffeIdErrorKind::TrailingSlash, offset - 1)
            } else {
                (SpiffeIdErrorKind::EmptySegment, offset)
            });
        }
        if *segment == "." || *segment == ".." {
            return Err((SpiffeIdErrorKind::DotSegment, offset));
        }
        if let Some(j) = segment.bytes().position(|b| !is_path_char(b)) {
            return Err((SpiffeIdErrorKind::PathChar, offset + j));
        }
        offset += segment.len() + 1;
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.text)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SpiffeIdErrorKind as K;
    use proptest::prelude::*;

    #[test]
    fn spec_examples_are_accepted() {
        for ok in [
            "spiffe://trust-domain-name/path",
            "spiffe://example.org/service",
            "spiffe://example.org",
            "spiffe://staging.example.com/payments/mysql",
            "spiffe://k8s-west.example.com/ns/staging/sa/default",
            "spiffe://cluster.local/ns/default/sa/sleep",
            "spiffe://a_b.c-d/P4th/With.Dots_and-Dashes",
        ] {
            let id = SpiffeId::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(id.to_string(), ok);
        }
    }

    #[test]
    fn each_rule_has_its_error() {
        let cases: &[(&str, SpiffeIdErrorKind, usize)] = &[
            ("", K::Empty, 0),
            ("http://example.org/x", K::Scheme, 0),
            ("SPIFFE://example.org/x", K::Scheme, 0),
            ("spiffe:/example.org/x", K::Scheme, 0),
            ("spiffe:///path", K::MissingTrustDomain, 9),
            ("spiffe://", K::MissingTrustDomain, 9),
            ("spiffe://Example.org/x", K::TrustDomainChar, 9),
            ("spiffe://example.org:8080/x", K::TrustDomainChar, 20),
            ("spiffe://user@example.org/x", K::TrustDomainChar, 13),
            ("spiffe://example.org?q=1", K::TrustDomainChar, 20),
            ("spiffe://example.org/", K::TrailingSlash, 20),
            ("spiffe://example.org/a/", K::TrailingSlash, 22),
            ("spiffe://example.org//a", K::EmptySegment, 21),
            ("spiffe://example.org/a//b", K::EmptySegment, 23),
            ("spiffe://example.org/./a", K::DotSegment, 21),
            ("spiffe://example.org/a/..", K::DotSegment, 23),
            ("spiffe://example.org/a?q", K::PathChar, 22),
            ("spiffe://example.org/a#f", K::PathChar, 22),
            ("spiffe://example.org/a%20b", K::PathChar, 22),
            ("spiffe://example.org/a b", K::PathChar, 22),
        ];
        for (input, kind, position) in cases {
            let err = SpiffeId::parse(input).expect_err(input);
            assert_eq!(
                (err.kind, err.position),
                (*kind, *position),
                "{input}: {err}"
            );
            assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
        }
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        assert_eq!(
            SpiffeId::parse(&long_td).unwrap_err().kind,
            K::TrustDomainTooLong
        );
        let long = format!("spiffe://example.org/{}", "a".repeat(2048));
        assert_eq!(SpiffeId::parse(&long).unwrap_err().kind, K::TooLong);
    }

    #[test]
    fn istio_form_helpers() {
        let id = SpiffeId::istio("cluster.local", "default", "sleep").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("sleep"));
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        assert_eq!(id.path(), "/ns/default/sa/sleep");
        for not_istio in [
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns/default/sa/sleep/extra",
            "spiffe://cluster.local/sa/sleep/ns/default",
        ] {
            let id = SpiffeId::parse(not_istio).unwrap();
            assert_eq!(id.namespace(), None, "{not_istio}");
            assert_eq!(id.require_istio().unwrap_err().kind, K::NotIstioForm);
        }
        assert!(SpiffeId::istio("cluster.local", "bad ns", "x").is_err());
    }

    fn trust_domain() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,40}"
    }

    fn segment() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,20}".prop_filter("dot segments are invalid", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip(td in trust_domain(), segs in proptest::collection::vec(segment(), 0..6)) {
            let text = format!("spiffe://{td}{}", segs.iter().map(|s| format!("/{s}")).collect::<String>());
            let id = SpiffeId::parse(&text).unwrap();
            prop_assert_eq!(id.as_str(), text.as_str());
            prop_assert_eq!(id.trust_domain(), td.as_str());
            prop_assert_eq!(SpiffeId::parse(&format!("{id}")).unwrap(), id);
        }

        #[test]
        fn one_bad_character_is_rejected(td in trust_domain(), seg in segment(), bad in "[A-Z:@?#%/ ]", at_td in any::<bool>()) {
            let text = if at_td {
                format!("spiffe://{td}{bad}/{seg}")
            } else {
                format!("spiffe://{td}/{seg}{bad}")
            };
            // Uppercase is fine in a path; '/' makes an empty segment or a trailing slash; the
            // rest are never allowed.
            let uppercase_in_path = !at_td && bad.chars().all(|c| c.is_ascii_uppercase());
            prop_assert_eq!(SpiffeId::parse(&text).is_ok(), uppercase_in_path, "{}", text);
        }

        #[test]
        fn arbitrary_input_never_panics(input in "\\PC{0,80}") {
            fuzz_spiffe_id(input.as_bytes());
        }
    }
}
