//! `metricsd_config` and `logd_config`: the daemons' TOML config parsers on any text.
//!
//! Parsing never panics; a config that parses also passes its own validation again
//! (parsing validates, so a second pass disagreeing would mean a check that depends on
//! more than the values); a refusal has a message.

/// metricsd's parser.
pub fn metricsd(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match metricsd::Config::from_toml(text) {
        Ok(config) => {
            if let Err(e) = config.validate() {
                panic!("parsed, then refused: {e}");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// logd's parser.
pub fn logd(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match logd::Config::parse(text) {
        Ok(config) => {
            if let Err(e) = config.validate() {
                panic!("parsed, then refused: {e}");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
