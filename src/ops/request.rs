//! A request as it arrives on `{prefix}/cmd/{op}`, parsed and checked
//! without I/O: what the operation is, its id and its arguments, or the
//! refusal to send back. Everything a refusal echoes is bounded, whatever
//! the request held: property tests below feed it arbitrary bytes and
//! arbitrary JSON shaped like requests (run them longer with
//! `PROPTEST_CASES=100000 cargo test --lib ops::request`).

use crate::config::OPERATIONS;
use serde_json::{json, Map, Value};

/// Operations that change the device: they need an id, are de-duplicated,
/// keep a record and run one at a time.
pub const CHANGING: &[&str] = &[
    "reload",
    "pipeline/enable",
    "pipeline/disable",
    "model/update",
    "model/rollback",
];

/// Longest operation name or non-conforming id a reply echoes.
const ECHO_CHARS: usize = 64;

/// What the device allows (the `[operations]` section).
pub struct Policy<'a> {
    pub enabled: bool,
    pub allow: &'a [String],
}

/// A request that may run.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub op: &'static str,
    /// Required (and valid) for changing operations; optional otherwise.
    pub id: Option<String>,
    pub args: Map<String, Value>,
}

impl Request {
    pub fn changing(&self) -> bool {
        CHANGING.contains(&self.op)
    }

    /// `args.pipeline`, checked by [`parse`] to be a bounded string.
    pub fn pipeline(&self) -> Option<&str> {
        self.args.get("pipeline").and_then(Value::as_str)
    }
}

/// Why a request is refused, and what the reply echoes (bounded).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The operation as named in the topic, at most 64 characters (a
    /// reply topic is built from it only when it is a known operation).
    pub op: String,
    /// The request's id when it was a string of at most 64 characters.
    pub id: Value,
    pub error: String,
}

pub use crate::topic::valid_id;

fn bounded(text: &str) -> String {
    text.chars().take(ECHO_CHARS).collect()
}

/// Parses and checks a request for `op` (the topic's levels after `cmd/`).
pub fn parse(op: &str, payload: &[u8], policy: &Policy) -> Result<Request, Refusal> {
    let refuse = |id: &Value, error: String| Refusal {
        op: bounded(op),
        id: match id {
            Value::String(s) if s.chars().count() <= ECHO_CHARS => id.clone(),
            _ => Value::Null,
        },
        error,
    };
    let known = OPERATIONS.iter().copied().find(|o| *o == op);
    // Before this API, cmd/ping and cmd/health took any payload: an empty
    // or non-JSON one is still a request without an id.
    let legacy = matches!(known, Some("ping" | "health"));
    let parsed: Result<Value, String> = if payload.iter().all(u8::is_ascii_whitespace) {
        Ok(json!({}))
    } else {
        serde_json::from_slice(payload).map_err(|e| format!("malformed request: {e}"))
    };
    let request = match parsed {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(refuse(
                &Value::Null,
                "malformed request: expected a JSON object {\"id\": \"…\", \"args\": {…}}".into(),
            ))
        }
        Err(e) if !legacy => return Err(refuse(&Value::Null, e)),
        Err(_) => Map::new(),
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let mut args = match request.get("args") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(a)) => a.clone(),
        Some(_) => {
            return Err(refuse(
                &id,
                "malformed request: args must be an object".into(),
            ))
        }
    };
    if let Some(extra) = request
        .keys()
        .find(|k| !matches!(k.as_str(), "id" | "args"))
    {
        return Err(refuse(
            &id,
            format!(
                "malformed request: unknown field {:?} (a request is {{\"id\", \"args\"}})",
                bounded(extra)
            ),
        ));
    }
    let Some(op) = known else {
        return Err(refuse(
            &id,
            format!(
                "unknown operation {:?}; known: {}",
                bounded(op),
                OPERATIONS.join(", ")
            ),
        ));
    };
    if !policy.enabled && !legacy {
        return Err(refuse(
            &id,
            "the operations API is disabled on this device (operations.enabled = false)".into(),
        ));
    }
    if policy.enabled && !policy.allow.iter().any(|a| a == op) {
        return Err(refuse(
            &id,
            format!("operation {op:?} is not allowed on this device (operations.allow)"),
        ));
    }
    let changing = CHANGING.contains(&op);
    let id = match &id {
        Value::String(s) if valid_id(s) => Some(s.clone()),
        Value::Null if !changing => None,
        _ => return Err(refuse(&id, "malformed request: id must be 1 to 64 characters of A-Z a-z 0-9 . _ - (and is required for operations that change the device)".into())),
    };
    match args.get("pipeline") {
        None => {}
        Some(Value::String(p)) if crate::config::check_name(p).is_ok() => {}
        Some(_) => {
            let id = id.map_or(Value::Null, Value::String);
            return Err(refuse(
                &id,
                format!(
                    "args.pipeline must be a pipeline's name (a string of at most {} characters)",
                    crate::config::MAX_NAME_CHARS
                ),
            ));
        }
    }
    // Read-only operations take no arguments; what they were given is not
    // kept (nor echoed).
    if !changing {
        args.clear();
    }
    Ok(Request { op, id, args })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[String]) -> Policy<'_> {
        Policy {
            enabled: true,
            allow,
        }
    }

    fn all() -> Vec<String> {
        OPERATIONS.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ids_are_topic_levels_and_file_names() {
        assert!(valid_id("op-2026.12.02_1"));
        for bad in ["", "a/b", "a+b", "#", ".hidden", &"x".repeat(65), "é"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_well_formed_request_parses() {
        let allow = all();
        let r = parse(
            "pipeline/disable",
            br#"{"id":"d-1","args":{"pipeline":"activity"}}"#,
            &policy(&allow),
        )
        .unwrap();
        assert_eq!(r.op, "pipeline/disable");
        assert_eq!(r.id.as_deref(), Some("d-1"));
        assert_eq!(r.pipeline(), Some("activity"));
        assert!(r.changing());
        // Legacy ping: any payload.
        let r = parse("ping", b"hello", &policy(&allow)).unwrap();
        assert_eq!((r.op, r.id), ("ping", None));
    }

    #[test]
    fn what_a_refusal_echoes_is_bounded() {
        let allow = all();
        let huge = "p".repeat(1 << 20);
        let payload = json!({"id": "big-1", "args": {"pipeline": huge}}).to_string();
        let e = parse("pipeline/enable", payload.as_bytes(), &policy(&allow)).unwrap_err();
        assert_eq!(e.id, json!("big-1"));
        assert!(e.error.len() < 200, "{}", e.error.len());
        let long_op = "x".repeat(10_000);
        let e = parse(&long_op, b"{}", &policy(&allow)).unwrap_err();
        assert!(e.op.len() <= 64 && e.error.len() < 400, "{e:?}");
        let e = parse(
            "ping",
            json!({"id": "i".repeat(5000)}).to_string().as_bytes(),
            &policy(&allow),
        )
        .unwrap_err();
        assert_eq!(e.id, Value::Null);
        let payload = json!({"id": "x", "k".repeat(5000): 1}).to_string();
        let e = parse("ping", payload.as_bytes(), &policy(&allow)).unwrap_err();
        assert!(e.error.len() < 200, "{}", e.error);
    }

    #[test]
    fn changing_operations_need_an_id_and_the_allow_list() {
        let allow = vec!["ping".to_string(), "pipeline/enable".to_string()];
        let e = parse("pipeline/enable", br#"{"args":{}}"#, &policy(&allow)).unwrap_err();
        assert!(e.error.contains("id must be"), "{}", e.error);
        let e = parse("model/update", br#"{"id":"u"}"#, &policy(&allow)).unwrap_err();
        assert!(e.error.contains("not allowed"), "{}", e.error);
        let off = Policy {
            enabled: false,
            allow: &allow,
        };
        assert!(parse("ping", b"", &off).is_ok());
        let e = parse("pipeline/enable", br#"{"id":"e"}"#, &off).unwrap_err();
        assert!(e.error.contains("disabled"), "{}", e.error);
    }

    /// JSON values of any shape, a few levels deep.
    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,300}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                proptest::collection::btree_map(".{0,20}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn requests_of_any_shape_parse_or_are_refused_with_a_bounded_echo(
            op in proptest::sample::select(OPERATIONS.to_vec()),
            id in json_value(),
            args in json_value(),
            pipeline in json_value(),
            extra in proptest::option::of(".{0,40}"),
        ) {
            let mut request = json!({"id": id, "args": args});
            if let Some(a) = request["args"].as_object_mut() {
                a.insert("pipeline".into(), pipeline);
            }
            if let Some(k) = extra {
                request[k] = json!(1);
            }
            let allow = all();
            let payload = request.to_string();
            match parse(op, payload.as_bytes(), &policy(&allow)) {
                Ok(r) => {
                    proptest::prop_assert_eq!(r.op, op);
                    if r.changing() {
                        proptest::prop_assert!(r.id.as_deref().is_some_and(valid_id));
                    }
                    if let Some(p) = r.pipeline() {
                        proptest::prop_assert!(crate::config::check_name(p).is_ok());
                    }
                }
                Err(e) => {
                    proptest::prop_assert!(e.op.chars().count() <= 64);
                    proptest::prop_assert!(e.error.len() < 1024, "{}", e.error);
                    proptest::prop_assert!(e.id.as_str().is_none_or(|s| s.chars().count() <= 64));
                }
            }
        }

        #[test]
        fn any_bytes_parse_or_are_refused_with_a_bounded_echo(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            op in "[a-z/]{0,80}",
        ) {
            let allow = all();
            match parse(&op, &payload, &policy(&allow)) {
                Ok(r) => proptest::prop_assert!(OPERATIONS.contains(&r.op)),
                Err(e) => {
                    proptest::prop_assert!(e.op.chars().count() <= 64);
                    proptest::prop_assert!(e.error.len() < 1024);
                }
            }
        }
    }
}
