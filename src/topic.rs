//! MQTT topic filters (with wildcard captures), result-topic templates, and
//! what a broker takes. A leaf: configuration validation and the MQTT
//! transport both use it.

/// A parsed subscription filter such as `sensors/+/accel` or `plant/#`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    raw: String,
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Exact(String),
    One,
    Rest,
}

impl TopicFilter {
    /// Parses a filter. A shared subscription, `$share/{group}/{filter}`
    /// (MQTT 5, and mosquitto, EMQX, HiveMQ, VerneMQ under 3.1.1 too), is
    /// subscribed as written and matched against real topics as `{filter}`.
    pub fn parse(filter: &str) -> Result<TopicFilter, String> {
        if filter.is_empty() {
            return Err("an empty topic filter matches nothing".into());
        }
        let matched = match filter.strip_prefix("$share/") {
            None => filter,
            Some(shared) => match shared.split_once('/') {
                Some((group, rest)) if !group.is_empty() && !group.contains(['+', '#']) && !rest.is_empty() => rest,
                _ => {
                    return Err(format!(
                        "{filter:?}: a shared subscription is $share/GROUP/FILTER, with a group name free of '+' and '#'"
                    ))
                }
            },
        };
        let parts: Vec<&str> = matched.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            levels.push(match *part {
                "+" => Level::One,
                "#" if i == parts.len() - 1 => Level::Rest,
                "#" => return Err(format!("{filter:?}: '#' is only allowed as the last level")),
                p if p.contains(['+', '#']) => {
                    return Err(format!("{filter:?}: wildcards must fill a whole level"));
                }
                p => Level::Exact(p.to_owned()),
            });
        }
        Ok(TopicFilter {
            raw: filter.to_owned(),
            levels,
        })
    }

    /// The filter as subscribed (with its `$share/{group}/` prefix).
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The shared-subscription group, if the filter is `$share/{group}/…`.
    pub fn share_group(&self) -> Option<&str> {
        self.raw.strip_prefix("$share/")?.split('/').next()
    }

    /// Number of wildcard levels, i.e. of `{N}` captures a match yields.
    pub fn wildcards(&self) -> usize {
        self.levels
            .iter()
            .filter(|l| !matches!(l, Level::Exact(_)))
            .count()
    }

    /// Matches `topic` and returns the text of each wildcard level in order
    /// (`#` captures the rest of the topic, slashes included).
    pub fn captures<'t>(&self, topic: &'t str) -> Option<Vec<&'t str>> {
        // Vec::new allocates on the first push only: a topic that fails at its
        // first level (most non-command traffic in the router) costs nothing.
        let mut caps = Vec::new();
        self.walk(topic, |c| caps.push(c)).then_some(caps)
    }

    /// Whether `topic` matches, without collecting captures: this runs in
    /// the MQTT poll loop for every message and pipeline.
    pub fn matches(&self, topic: &str) -> bool {
        self.walk(topic, |_| {})
    }

    /// The one matching walk: calls `capture` with the text of each wildcard
    /// level in order and returns whether the whole topic matched.
    fn walk<'t>(&self, topic: &'t str, mut capture: impl FnMut(&'t str)) -> bool {
        let mut rest = topic;
        for (i, level) in self.levels.iter().enumerate() {
            if let Level::Rest = level {
                // MQTT: "sport/#" also matches "sport"; topics starting with $ never match a leading wildcard.
                if i == 0 && topic.starts_with('$') {
                    return false;
                }
                capture(rest);
                return true;
            }
            let (head, tail) = match rest.find('/') {
                Some(at) => (&rest[..at], Some(&rest[at + 1..])),
                None => (rest, None),
            };
            match level {
                Level::Exact(e) if e != head => return false,
                Level::One if i == 0 && head.starts_with('$') => return false,
                Level::One => capture(head),
                _ => {}
            }
            match tail {
                Some(t) => rest = t,
                None => {
                    return match &self.levels[i + 1..] {
                        [] => true,
                        [Level::Rest] => {
                            capture("");
                            true
                        }
                        _ => false,
                    };
                }
            }
        }
        false // topic has more levels than the filter
    }
}

/// Checks a template's placeholders: `{device}`, `{pipeline}`, `{prefix}`
/// and `{1}`…`{max_capture}`.
pub fn check_template(template: &str, max_capture: usize) -> Result<(), String> {
    if template.is_empty() {
        return Err("an empty topic".into());
    }
    if template.contains(['+', '#']) {
        return Err(format!(
            "{template:?}: a publish topic may not contain '+' or '#'"
        ));
    }
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("{template:?}: unclosed '{{'"));
        };
        let name = &rest[open + 1..open + close];
        match name {
            "device" | "pipeline" | "prefix" => {}
            n => match n.parse::<usize>() {
                Ok(k) if k >= 1 && k <= max_capture => {}
                Ok(k) => {
                    return Err(format!(
                        "{template:?}: {{{k}}} needs a wildcard level {k}, but the filters have {max_capture}"
                    ))
                }
                Err(_) => return Err(format!("{template:?}: unknown placeholder {{{n}}}")),
            },
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
}

/// What the broker will take: a publish outside these limits makes the
/// broker (or the MQTT client) drop the whole connection, so it is refused
/// before it is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishLimits {
    /// Topic length in bytes (MQTT's own limit is 65,535).
    pub max_topic_bytes: usize,
    /// Topic levels (`a/b/c` has 3); mosquitto refuses more than 201.
    pub max_topic_levels: usize,
    /// Whole PUBLISH packet, header included (`broker.max_packet_bytes`).
    pub max_packet_bytes: usize,
}

impl Default for PublishLimits {
    fn default() -> Self {
        PublishLimits {
            max_topic_bytes: MAX_TOPIC_BYTES,
            max_topic_levels: 201,
            max_packet_bytes: 4 << 20,
        }
    }
}

/// MQTT strings carry a 16-bit length.
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// The size of a PUBLISH packet as it goes on the wire: fixed header
/// (type byte and the remaining length's varint), topic with its length,
/// packet id (QoS 1 and 2) and payload.
pub fn publish_packet_bytes(topic_bytes: usize, payload_bytes: usize, qos0: bool) -> usize {
    let remaining = 2 + topic_bytes + if qos0 { 0 } else { 2 } + payload_bytes;
    let varint = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + varint + remaining
}

/// Why a message cannot be published; the reason names the limit.
pub fn check_publishable(
    topic: &str,
    payload_bytes: usize,
    qos0: bool,
    limits: &PublishLimits,
) -> Result<(), String> {
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return Err(format!(
            "topic {:?} is not a valid publish topic (empty, or has '+', '#' or NUL)",
            shorten(topic)
        ));
    }
    let max_bytes = limits.max_topic_bytes.min(MAX_TOPIC_BYTES);
    if topic.len() > max_bytes {
        return Err(format!(
            "topic of {} bytes is over the limit of {max_bytes} (broker.max_topic_bytes): {:?}",
            topic.len(),
            shorten(topic)
        ));
    }
    let levels = topic.bytes().filter(|b| *b == b'/').count() + 1;
    if levels > limits.max_topic_levels {
        return Err(format!(
            "topic of {levels} levels is over the limit of {} (broker.max_topic_levels): {:?}",
            limits.max_topic_levels,
            shorten(topic)
        ));
    }
    let packet = publish_packet_bytes(topic.len(), payload_bytes, qos0);
    if packet > limits.max_packet_bytes {
        return Err(format!(
            "a {packet}-byte packet is over the limit of {} (broker.max_packet_bytes)",
            limits.max_packet_bytes
        ));
    }
    Ok(())
}

/// The start of a long topic, for messages.
pub(crate) fn shorten(topic: &str) -> String {
    const KEEP: usize = 80;
    if topic.len() <= KEEP {
        return topic.to_owned();
    }
    let mut end = KEEP;
    while !topic.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &topic[..end])
}

/// A results template with its fixed placeholders already substituted.
#[derive(Debug, Clone)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Capture(usize),
}

impl TopicTemplate {
    /// `template` must have passed [`check_template`].
    pub fn new(template: &str, device: &str, pipeline: &str, prefix: &str) -> TopicTemplate {
        let template = template
            .replace("{prefix}", prefix)
            .replace("{device}", device)
            .replace("{pipeline}", pipeline);
        let mut parts = Vec::new();
        let mut rest = template.as_str();
        while let Some(open) = rest.find('{') {
            let close = open + rest[open..].find('}').unwrap_or(rest.len() - open);
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            match rest[open + 1..close].parse::<usize>() {
                Ok(k) => parts.push(Part::Capture(k)),
                Err(_) => parts.push(Part::Text(
                    rest[open..=close.min(rest.len() - 1)].to_owned(),
                )),
            }
            rest = rest.get(close + 1..).unwrap_or("");
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        TopicTemplate { parts }
    }

    pub fn render(&self, captures: &[&str]) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Capture(k) => out.push_str(captures.get(k - 1).copied().unwrap_or("")),
            }
        }
        out
    }
}

/// A Home Assistant discovery id part: discovery ids allow `[a-zA-Z0-9_-]`: anything else becomes `_`
/// (config validation refuses two pipelines that would meet here).
pub fn discovery_id(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A valid id: what a topic level and a file name can both hold.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishable_topics_stay_within_the_broker_limits() {
        let limits = PublishLimits {
            max_topic_bytes: 100,
            max_topic_levels: 4,
            max_packet_bytes: 64,
        };
        let ok = |t: &str, n| check_publishable(t, n, false, &limits);
        assert!(ok("a/b/c/d", 10).is_ok());
        assert!(ok("a/b/c/d/e", 10).unwrap_err().contains("5 levels"));
        assert!(ok(&"x".repeat(101), 0).unwrap_err().contains("101 bytes"));
        assert!(ok("a/+", 0).is_err());
        assert!(ok("", 0).is_err());
        // 1 + 1 + (2 + 1 + 2 + 58) = 65 bytes: one over.
        assert!(ok("t", 57).is_ok());
        assert!(ok("t", 58).unwrap_err().contains("65-byte packet"));
        assert!(
            check_publishable("t", 58, true, &limits).is_ok(),
            "QoS 0 has no packet id"
        );
        // MQTT's own limit holds whatever is configured.
        let loose = PublishLimits {
            max_topic_bytes: usize::MAX,
            max_topic_levels: usize::MAX,
            max_packet_bytes: usize::MAX,
        };
        assert!(check_publishable(&"y".repeat(65_536), 0, false, &loose).is_err());
    }

    #[test]
    fn packet_size_counts_the_remaining_length_varint() {
        // rumqttc refuses what is over its max_outgoing_packet_size by this count.
        assert_eq!(publish_packet_bytes(1, 0, true), 1 + 1 + 3);
        assert_eq!(publish_packet_bytes(1, 122, false), 1 + 1 + 127);
        assert_eq!(publish_packet_bytes(1, 123, false), 1 + 2 + 128);
    }

    fn caps<'a>(filter: &str, topic: &'a str) -> Option<Vec<&'a str>> {
        TopicFilter::parse(filter).unwrap().captures(topic)
    }

    #[test]
    fn single_level_wildcards_capture_their_level() {
        assert_eq!(
            caps("sensors/+/accel", "sensors/pump-7/accel"),
            Some(vec!["pump-7"])
        );
        assert_eq!(caps("sensors/+/accel", "sensors/pump-7/gyro"), None);
        assert_eq!(caps("sensors/+/accel", "sensors/a/b/accel"), None);
        assert_eq!(caps("+/+", "a/b"), Some(vec!["a", "b"]));
        assert_eq!(caps("sensors/+", "sensors/"), Some(vec![""]));
        assert_eq!(caps("a/b", "a/b/c"), None);
        assert_eq!(caps("a/b/c", "a/b"), None);
    }

    #[test]
    fn multi_level_wildcard_captures_the_rest() {
        assert_eq!(
            caps("plant/#", "plant/line1/press/3"),
            Some(vec!["line1/press/3"])
        );
        assert_eq!(caps("plant/#", "plant"), Some(vec![""]));
        assert_eq!(caps("#", "x/y"), Some(vec!["x/y"]));
        assert_eq!(caps("#", "$SYS/uptime"), None);
        assert_eq!(caps("+/uptime", "$SYS/uptime"), None);
    }

    #[test]
    fn matches_agrees_with_captures() {
        let filters = ["sensors/+/accel", "plant/#", "#", "+/+", "a/b", "+/uptime"];
        let topics = [
            "sensors/p/accel",
            "sensors/p/gyro",
            "plant",
            "plant/a/b",
            "$SYS/uptime",
            "a/b",
            "a/b/c",
            "x",
        ];
        for f in filters {
            let f = TopicFilter::parse(f).unwrap();
            for t in topics {
                assert_eq!(
                    f.matches(t),
                    f.captures(t).is_some(),
                    "{} on {t}",
                    f.as_str()
                );
            }
        }
    }

    #[test]
    fn shared_subscriptions_match_the_real_topic_and_keep_their_group() {
        let f = TopicFilter::parse("$share/edge/sensors/+/imu").unwrap();
        assert_eq!(f.as_str(), "$share/edge/sensors/+/imu");
        assert_eq!(f.share_group(), Some("edge"));
        assert_eq!(f.wildcards(), 1);
        assert_eq!(f.captures("sensors/w1/imu"), Some(vec!["w1"]));
        assert!(!f.matches("$share/edge/sensors/w1/imu"));
        assert!(!f.matches("sensors/w1/gps"));
        assert_eq!(TopicFilter::parse("sensors/#").unwrap().share_group(), None);
        for bad in [
            "$share/edge",
            "$share//sensors/#",
            "$share/g+/x",
            "$share/edge/",
        ] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn malformed_filters_are_rejected() {
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("a/b+").is_err());
        assert!(TopicFilter::parse("").is_err());
    }

    #[test]
    fn templates_render_captures_and_names() {
        check_template("edgeinfer/{device}/results/{pipeline}/{1}", 1).unwrap();
        let t = TopicTemplate::new(
            "edgeinfer/{device}/results/{pipeline}/{1}",
            "gw",
            "vib",
            "edgeinfer/gw",
        );
        assert_eq!(t.render(&["pump-7"]), "edgeinfer/gw/results/vib/pump-7");
        let t = TopicTemplate::new("{prefix}/r/{2}-{1}", "gw", "p", "edgeinfer/gw");
        assert_eq!(t.render(&["a", "b"]), "edgeinfer/gw/r/b-a");
    }

    #[test]
    fn template_errors_name_the_problem() {
        assert!(check_template("out/{2}", 1).unwrap_err().contains("{2}"));
        assert!(check_template("out/{nope}", 1)
            .unwrap_err()
            .contains("nope"));
        assert!(check_template("out/+", 0).is_err());
        assert!(check_template("out/{1", 1).is_err());
    }
}
