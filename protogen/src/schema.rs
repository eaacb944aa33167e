//! Compares two compiled schemas: ours and Istio's.
//!
//! Every message, enum and RPC we declare must exist in Istio's with the same fields (number,
//! name, type, label, `optional`, oneof), values and signatures, and nothing more or less; what
//! Istio declares that we do not is listed apart (see [`Report::only_theirs`]). Packages
//! `google.*` are the well-known types and are not compared.

use std::collections::BTreeMap;

use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

/// What the comparison found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Items we declare that differ from Istio's (or that Istio lacks): each a sentence.
    pub differences: Vec<String>,
    /// Items Istio declares that we do not (full names).
    pub only_theirs: Vec<String>,
}

/// One declared item, reduced to what the wire and the generated code depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    /// Field number -> its description.
    Message(BTreeMap<i32, String>),
    /// Value number -> name.
    Enum(BTreeMap<i32, String>),
    /// `input -> output`, with streaming marks.
    Method(String),
}

/// Compares `ours` with `theirs`.
pub fn compare(ours: &FileDescriptorSet, theirs: &FileDescriptorSet) -> Report {
    let ours = items(ours);
    let theirs = items(theirs);
    let mut report = Report::default();
    for (name, item) in &ours {
        match theirs.get(name) {
            None => report
                .differences
                .push(format!("{name}: Istio does not declare it")),
            Some(other) => differ(name, item, other, &mut report.differences),
        }
    }
    report.only_theirs = theirs
        .keys()
        .filter(|n| !ours.contains_key(*n))
        .cloned()
        .collect();
    report
}

fn differ(name: &str, ours: &Item, theirs: &Item, out: &mut Vec<String>) {
    match (ours, theirs) {
        (Item::Message(a), Item::Message(b)) | (Item::Enum(a), Item::Enum(b)) => {
            for (n, mine) in a {
                match b.get(n) {
                    None => out.push(format!("{name} #{n} ({mine}): Istio has no such number")),
                    Some(their) if their != mine => {
                        out.push(format!("{name} #{n}: ours is {mine}, Istio's is {their}"))
                    }
                    Some(_) => {}
                }
            }
            for (n, their) in b.iter().filter(|(n, _)| !a.contains_key(n)) {
                out.push(format!("{name} #{n} ({their}): we do not declare it"));
            }
        }
        (Item::Method(a), Item::Method(b)) if a != b => {
            out.push(format!("{name}: ours is {a}, Istio's is {b}"))
        }
        (Item::Method(_), Item::Method(_)) => {}
        _ => out.push(format!("{name}: a different kind of item in Istio's")),
    }
}

fn items(set: &FileDescriptorSet) -> BTreeMap<String, Item> {
    let mut out = BTreeMap::new();
    for file in &set.file {
        let package = file.package();
        if package.starts_with("google.") {
            continue;
        }
        let prefix = format!(".{package}");
        for m in &file.message_type {
            message(&prefix, m, &mut out);
        }
        for e in &file.enum_type {
            enumeration(&prefix, e, &mut out);
        }
        for s in &file.service {
            for m in &s.method {
                let sig = format!(
                    "{}{} -> {}{}",
                    if m.client_streaming() { "stream " } else { "" },
                    m.input_type(),
                    if m.server_streaming() { "stream " } else { "" },
                    m.output_type()
                );
                out.insert(
                    format!("{prefix}.{}/{}", s.name(), m.name()),
                    Item::Method(sig),
                );
            }
        }
    }
    out
}

fn message(prefix: &str, m: &DescriptorProto, out: &mut BTreeMap<String, Item>) {
    let name = format!("{prefix}.{}", m.name());
    let fields = m
        .field
        .iter()
        .map(|f| {
            let oneof = f
                .oneof_index
                .filter(|_| !f.proto3_optional())
                .and_then(|i| m.oneof_decl.get(usize::try_from(i).ok()?))
                .map(|o| format!(" in oneof {}", o.name()))
                .unwrap_or_default();
            let description = format!(
                "{} {:?}{} {}{}{}",
                f.name(),
                f.label(),
                if f.proto3_optional() { " optional" } else { "" },
                format!("{:?}", f.r#type()).to_lowercase(),
                f.type_name
                    .as_deref()
                    .map(|t| format!(" {t}"))
                    .unwrap_or_default(),
                oneof
            );
            (f.number(), description)
        })
        .collect();
    for nested in &m.nested_type {
        // Map entries are part of their field's type name; they are compared as messages too.
        message(&name, nested, out);
    }
    for e in &m.enum_type {
        enumeration(&name, e, out);
    }
    out.insert(name, Item::Message(fields));
}

fn enumeration(prefix: &str, e: &EnumDescriptorProto, out: &mut BTreeMap<String, Item>) {
    out.insert(
        format!("{prefix}.{}", e.name()),
        Item::Enum(
            e.value
                .iter()
                .map(|v| (v.number(), v.name().to_owned()))
                .collect(),
        ),
    );
}
