//! Topic filters, matching and result templates: never panic; a capture
//! count never exceeds the filter's wildcards; rendered topics have no
//! wildcard characters when the template passed its check.
#![no_main]
use edgeinfer::mqtt::{check_template, TopicFilter, TopicTemplate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.splitn(3, '\n');
    let (filter, topic, template) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let Ok(f) = TopicFilter::parse(filter) else { return };
    if let Some(caps) = f.captures(topic) {
        assert!(caps.len() <= f.wildcards());
        if check_template(template, f.wildcards()).is_ok() {
            let rendered = TopicTemplate::new(template, "dev", "pipe", "edgeinfer/dev").render(&caps);
            if !topic.contains(['+', '#']) {
                assert!(!rendered.contains(['+', '#']), "{rendered:?}");
            }
        }
    }
});
