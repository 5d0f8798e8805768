//! `egress::cert::names`: the subject and issuer of the certificate the gateway connection
//! presented (shown by `sallyport doctor`; behind a TLS-inspecting proxy, whoever re-signed it
//! chose every byte).
//!
//! Properties checked: no panic and no unbounded work whatever the DER; names are never longer
//! than the input (plus the `CN=`/`O=` labels).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((subject, issuer)) = egress::cert::names(data) {
        assert!(subject.len() <= data.len() * 3 + 32);
        assert!(issuer.len() <= data.len() * 3 + 32);
    }
});
