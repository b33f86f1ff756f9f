//! Canonical XML 1.1 (W3C REC `xml-c14n11`, 2 May 2008), without comments: the subset that
//! NVIDIA's signed RIMs need, rendered from a parsed [`roxmltree`] tree.
//!
//! Two node sets are supported, the two an enveloped XMLDSig over `URI=""` produces:
//!
//! - [`document_without`]: the whole document minus one element's subtree (the
//!   `enveloped-signature` transform applied to `URI=""`; comments are not in that node set,
//!   XMLDSig §4.4.3.3);
//! - [`subtree`]: one element and all its descendants (`SignedInfo`), whose ancestors are not
//!   in the node set.
//!
//! Rules implemented, by the spec's section (C14N 1.1 §2.3 "Processing Model", §2.4):
//!
//! - no XML declaration, no DTD; the document element only (no text outside it);
//! - empty elements as a start/end tag pair; character and entity references replaced
//!   (the parser already resolved them; CDATA sections are text);
//! - text escaping: `&` `<` `>` and `#xD` as `&amp;` `&lt;` `&gt;` `&#xD;`;
//! - attribute value escaping: `&` `<` `"` `#x9` `#xA` `#xD` as `&amp;` `&lt;` `&quot;`
//!   `&#x9;` `&#xA;` `&#xD;` (values are already normalized by the parser, XML 1.0 §3.3.3);
//! - namespace declarations before attributes, sorted by prefix, the default one first;
//!   a declaration is rendered only where the nearest output ancestor does not already
//!   have the same binding in scope; for an element whose parent is not output (the apex
//!   of [`subtree`]) every in-scope namespace is rendered (the inherited ones included);
//!   `xmlns=""` only where the output parent has a non-empty default namespace; the `xml`
//!   namespace never;
//! - attributes sorted by namespace URI (none first) then local name;
//! - element and attribute names written with the prefix the document used (read from the
//!   source text: two prefixes may bind the same URI, as in NVIDIA's RIMs).
//!
//! Refused with [`C14nError::Unsupported`] instead of guessed: processing instructions
//! (they are output by C14N, with rules for their position this subset does not need),
//! `xml:*` attributes on an ancestor of a [`subtree`] apex (C14N 1.1 §2.4 inheritance of
//! `xml:lang`/`xml:space` and `xml:base` fix-up), nesting deeper than [`MAX_DEPTH`].
//! DTDs are refused by the parser (`roxmltree`'s default `allow_dtd = false`). Comments are
//! not in either node set and are dropped.

use std::collections::BTreeMap;

use roxmltree::{Node, NodeType, NS_XML_URI};

/// The deepest element nesting accepted (NVIDIA's RIMs nest 4 levels).
pub const MAX_DEPTH: usize = 64;

/// Why a tree cannot be canonicalized by this subset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum C14nError {
    /// A construct outside the supported subset of C14N 1.1.
    #[error("canonical XML 1.1: {0} is outside the subset cvm-warden implements")]
    Unsupported(String),
}

/// In-scope namespaces as output so far: prefix (`None` = default) → URI (never empty).
type Rendered<'a> = BTreeMap<Option<&'a str>, &'a str>;

/// Canonical form of the whole document without `excluded` and its descendants (the
/// `enveloped-signature` transform of `URI=""`, then C14N 1.1 without comments).
pub fn document_without(
    source: &str,
    doc: &roxmltree::Document<'_>,
    excluded: Node<'_, '_>,
) -> Result<Vec<u8>, C14nError> {
    let mut out = Vec::new();
    for child in doc.root().children() {
        match child.node_type() {
            NodeType::Element => {
                render_element(source, child, &Rendered::new(), Some(excluded), 0, &mut out)?
            }
            NodeType::Comment => {}
            NodeType::PI => return Err(pi_refused(child)),
            // Text outside the document element is not part of the data model.
            NodeType::Text | NodeType::Root => {}
        }
    }
    Ok(out)
}

/// Canonical form of `apex` and its descendants as a document subset (the canonical
/// `SignedInfo`): the apex renders every namespace in scope, inherited ones included.
pub fn subtree(source: &str, apex: Node<'_, '_>) -> Result<Vec<u8>, C14nError> {
    for ancestor in apex.ancestors().skip(1) {
        if let Some(attribute) = ancestor
            .attributes()
            .find(|a| a.namespace() == Some(NS_XML_URI))
        {
            return Err(C14nError::Unsupported(format!(
                "the xml:{} attribute on <{}>, an ancestor of the canonicalized <{}> \
                 (C14N 1.1 §2.4 inheritance)",
                attribute.name(),
                ancestor.tag_name().name(),
                apex.tag_name().name()
            )));
        }
    }
    let mut out = Vec::new();
    render_element(source, apex, &Rendered::new(), None, 0, &mut out)?;
    Ok(out)
}

fn pi_refused(node: Node<'_, '_>) -> C14nError {
    let target = node.pi().map(|pi| pi.target).unwrap_or("?");
    C14nError::Unsupported(format!("the processing instruction <?{target} …?>"))
}

fn render_element<'a>(
    source: &'a str,
    element: Node<'a, '_>,
    parent: &Rendered<'a>,
    excluded: Option<Node<'_, '_>>,
    depth: usize,
    out: &mut Vec<u8>,
) -> Result<(), C14nError> {
    if excluded == Some(element) {
        return Ok(());
    }
    if depth >= MAX_DEPTH {
        return Err(C14nError::Unsupported(format!(
            "element nesting deeper than {MAX_DEPTH}"
        )));
    }
    let name = element_qname(source, element)?;
    out.push(b'<');
    out.extend_from_slice(name.as_bytes());

    // Namespace axis: the element's in-scope namespaces (roxmltree lists inherited ones).
    // `xmlns=""` (an empty default) means "no default namespace" and is not kept.
    let mut in_scope = Rendered::new();
    for ns in element.namespaces() {
        if ns.uri() == NS_XML_URI || (ns.name().is_none() && ns.uri().is_empty()) {
            continue;
        }
        in_scope.insert(ns.name(), ns.uri());
    }
    // Default namespace first (None < Some), then by prefix.
    if !in_scope.contains_key(&None) && parent.contains_key(&None) {
        out.extend_from_slice(b" xmlns=\"\"");
    }
    for (prefix, uri) in &in_scope {
        if parent.get(prefix) == Some(uri) {
            continue;
        }
        match prefix {
            None => out.extend_from_slice(b" xmlns=\""),
            Some(p) => {
                out.extend_from_slice(b" xmlns:");
                out.extend_from_slice(p.as_bytes());
                out.extend_from_slice(b"=\"");
            }
        }
        escape_attribute(uri, out);
        out.push(b'"');
    }

    // Attribute axis: sorted by (namespace URI, local name); no namespace sorts first.
    let mut attributes: Vec<(&str, &str, &str, &str)> = Vec::new();
    for attribute in element.attributes() {
        let qname = source.get(attribute.range_qname()).ok_or_else(|| {
            C14nError::Unsupported(format!(
                "attribute {} whose name is not in the source text",
                attribute.name()
            ))
        })?;
        attributes.push((
            attribute.namespace().unwrap_or(""),
            attribute.name(),
            qname,
            attribute.value(),
        ));
    }
    attributes.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    for (_, _, qname, value) in attributes {
        out.push(b' ');
        out.extend_from_slice(qname.as_bytes());
        out.extend_from_slice(b"=\"");
        escape_attribute(value, out);
        out.push(b'"');
    }
    out.push(b'>');

    for child in element.children() {
        match child.node_type() {
            NodeType::Element => {
                render_element(source, child, &in_scope, excluded, depth + 1, out)?
            }
            NodeType::Text => escape_text(child.text().unwrap_or(""), out),
            NodeType::Comment => {}
            NodeType::PI => return Err(pi_refused(child)),
            NodeType::Root => {}
        }
    }
    out.extend_from_slice(b"</");
    out.extend_from_slice(name.as_bytes());
    out.push(b'>');
    Ok(())
}

/// The element's name as written in the source (`prefix:local` or `local`).
fn element_qname<'a>(source: &'a str, element: Node<'a, '_>) -> Result<&'a str, C14nError> {
    let start = element.range().start + 1;
    let rest = source.get(start..).unwrap_or("");
    let end = rest
        .find(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>')
        .unwrap_or(rest.len());
    let qname = &rest[..end];
    let local = qname.rsplit(':').next().unwrap_or(qname);
    if local != element.tag_name().name() {
        return Err(C14nError::Unsupported(format!(
            "element <{}> whose name could not be read back from the source text",
            element.tag_name().name()
        )));
    }
    Ok(qname)
}

fn escape_text(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match c {
            '&' => out.extend_from_slice(b"&amp;"),
            '<' => out.extend_from_slice(b"&lt;"),
            '>' => out.extend_from_slice(b"&gt;"),
            '\r' => out.extend_from_slice(b"&#xD;"),
            c => push_char(c, out),
        }
    }
}

fn escape_attribute(value: &str, out: &mut Vec<u8>) {
    for c in value.chars() {
        match c {
            '&' => out.extend_from_slice(b"&amp;"),
            '<' => out.extend_from_slice(b"&lt;"),
            '"' => out.extend_from_slice(b"&quot;"),
            '\t' => out.extend_from_slice(b"&#x9;"),
            '\n' => out.extend_from_slice(b"&#xA;"),
            '\r' => out.extend_from_slice(b"&#xD;"),
            c => push_char(c, out),
        }
    }
}

fn push_char(c: char, out: &mut Vec<u8>) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(xml).unwrap()
    }

    fn whole(xml: &str) -> String {
        let doc = parse(xml);
        // Exclude nothing: pass a node that is not an element of the output (the root).
        let out = document_without(xml, &doc, doc.root()).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn apex(xml: &str, local: &str) -> Result<String, C14nError> {
        let doc = parse(xml);
        let node = doc
            .descendants()
            .find(|n| n.tag_name().name() == local)
            .unwrap();
        subtree(xml, node).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn c14n_2_3_empty_elements_become_start_end_pairs() {
        assert_eq!(whole("<a><b/></a>"), "<a><b></b></a>");
    }

    #[test]
    fn c14n_2_3_attributes_sorted_by_namespace_uri_then_local_name() {
        // From C14N 1.0 §3.3 (example "Start and End Tags"): unqualified first, then by URI.
        let xml = r#"<e xmlns:b="http://www.ietf.org" xmlns:a="http://www.w3.org" b:attr="sorted" attr2="all" attr="I'm" a:attr="out"/>"#;
        assert_eq!(
            whole(xml),
            r#"<e xmlns:a="http://www.w3.org" xmlns:b="http://www.ietf.org" attr="I'm" attr2="all" b:attr="sorted" a:attr="out"></e>"#
        );
    }

    #[test]
    fn c14n_2_3_default_namespace_first_and_superfluous_declarations_dropped() {
        let xml = r#"<a xmlns:z="urn:z" xmlns="urn:d"><b xmlns="urn:d" xmlns:z="urn:z"/><c xmlns:z="urn:other"/></a>"#;
        assert_eq!(
            whole(xml),
            r#"<a xmlns="urn:d" xmlns:z="urn:z"><b></b><c xmlns:z="urn:other"></c></a>"#
        );
    }

    #[test]
    fn c14n_2_3_default_namespace_undeclared_only_under_a_non_empty_default() {
        let xml = r#"<a xmlns="urn:d"><b xmlns=""><c xmlns=""/></b></a>"#;
        assert_eq!(
            whole(xml),
            r#"<a xmlns="urn:d"><b xmlns=""><c></c></b></a>"#
        );
        assert_eq!(whole(r#"<a><b xmlns=""/></a>"#), "<a><b></b></a>");
    }

    #[test]
    fn c14n_2_3_text_and_attribute_escaping() {
        let xml =
            "<a t=\"&quot;&amp;&lt;&gt;&#9;&#10;&#13;'\">&amp;&lt;&gt;&#13;\"'<![CDATA[<x>]]></a>";
        assert_eq!(
            whole(xml),
            "<a t=\"&quot;&amp;&lt;>&#x9;&#xA;&#xD;'\">&amp;&lt;&gt;&#xD;\"'&lt;x&gt;</a>"
        );
    }

    #[test]
    fn xml_1_0_3_3_3_literal_whitespace_in_attributes_is_normalized_by_the_parser() {
        assert_eq!(whole("<a t=\"x\ty\nz\"/>"), "<a t=\"x y z\"></a>");
    }

    #[test]
    fn xml_1_0_2_11_line_ends_are_normalized_before_canonicalization() {
        assert_eq!(whole("<a>x\r\ny\rz</a>"), "<a>x\ny\nz</a>");
    }

    #[test]
    fn c14n_1_1_comments_are_not_in_the_node_set() {
        assert_eq!(whole("<!--c--><a>x<!--y-->z</a><!--e-->"), "<a>xz</a>");
    }

    #[test]
    fn processing_instructions_are_refused() {
        let xml = "<a><?pi data?></a>";
        let doc = parse(xml);
        let err = document_without(xml, &doc, doc.root()).unwrap_err();
        assert!(err.to_string().contains("<?pi"), "{err}");
    }

    #[test]
    fn dtds_are_refused_by_the_parser() {
        assert!(roxmltree::Document::parse("<!DOCTYPE a [<!ATTLIST a x CDATA 'd'>]><a/>").is_err());
    }

    #[test]
    fn prefixes_are_written_as_the_document_wrote_them() {
        // Two prefixes bind the same URI (as in NVIDIA's RIMs): each name keeps its own.
        let xml = r#"<r xmlns="urn:s" xmlns:n0="urn:s" xmlns:h="urn:h" xmlns:H="urn:h"><n0:p h:x="1" H:y="2"/></r>"#;
        assert_eq!(
            whole(xml),
            r#"<r xmlns="urn:s" xmlns:H="urn:h" xmlns:h="urn:h" xmlns:n0="urn:s"><n0:p h:x="1" H:y="2"></n0:p></r>"#
        );
    }

    #[test]
    fn the_excluded_subtree_is_left_out_and_surrounding_text_kept() {
        let xml = "<r>\n  <a/>\n<s:Sig xmlns:s=\"urn:s\"><s:b/></s:Sig>\n</r>";
        let doc = parse(xml);
        let sig = doc
            .descendants()
            .find(|n| n.tag_name().name() == "Sig")
            .unwrap();
        let out = document_without(xml, &doc, sig).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "<r>\n  <a></a>\n\n</r>");
    }

    #[test]
    fn c14n_2_3_subset_apex_renders_inherited_namespaces() {
        let xml = r#"<r xmlns="urn:d" xmlns:n="urn:n"><s:S xmlns:s="urn:s"><s:I a="1"><s:M/></s:I></s:S></r>"#;
        assert_eq!(
            apex(xml, "I").unwrap(),
            r#"<s:I xmlns="urn:d" xmlns:n="urn:n" xmlns:s="urn:s" a="1"><s:M></s:M></s:I>"#
        );
    }

    #[test]
    fn c14n_1_1_2_4_xml_attributes_on_an_ancestor_are_refused() {
        let xml = r#"<r xml:lang="en"><s><i/></s></r>"#;
        let err = apex(xml, "i").unwrap_err();
        assert!(err.to_string().contains("xml:lang"), "{err}");
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_refused() {
        let xml = format!(
            "{}{}",
            "<a>".repeat(MAX_DEPTH + 1),
            "</a>".repeat(MAX_DEPTH + 1)
        );
        let doc = parse(&xml);
        assert!(document_without(&xml, &doc, doc.root()).is_err());
    }
}
