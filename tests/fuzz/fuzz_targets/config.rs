//! Config parsing and validation: never panic, whatever the text.
#![no_main]
use edgeinfer::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = Config::parse(text, std::path::Path::new("/nonexistent")) {
        let _ = config.validate();
    }
});
