//! Just enough X.509 to say whose certificate the gateway connection presented: the subject and
//! issuer names (CN, O) of a DER certificate. `doctor` uses it to show when a TLS-inspecting
//! proxy re-signed the gateway's certificate ("issued by CN=Corp Inspection CA").
//!
//! A tiny DER walker rather than a full X.509 crate: we read two names and nothing else, and
//! trust decisions stay with rustls/webpki. It reads bytes from the network, so it never panics
//! (checked slicing only) and has a fuzz target (`cert_names`).

/// One TLV: (tag, contents, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&len0, b) = b.split_first()?;
    let (len, b) = if len0 < 0x80 {
        (len0 as usize, b)
    } else {
        let n = (len0 & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
        (len, &b[n..])
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

/// Reads a Name: `CN=…, O=…` (in that order, when present).
fn name(b: &[u8]) -> Option<String> {
    let mut cn = None;
    let mut o = None;
    let mut rdns = b;
    while !rdns.is_empty() {
        let (_, set, rest) = tlv(rdns)?;
        rdns = rest;
        let mut atvs = set;
        while !atvs.is_empty() {
            let (_, atv, rest) = tlv(atvs)?;
            atvs = rest;
            let (tag, oid, v) = tlv(atv)?;
            let (_, value, _) = tlv(v)?;
            if tag != 0x06 {
                continue;
            }
            // Whoever re-signed chose these bytes: no control characters (log forging,
            // terminal escapes), and bounded.
            let text: String = String::from_utf8_lossy(value)
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .take(128)
                .collect();
            match oid {
                [0x55, 0x04, 0x03] => cn = Some(text),
                [0x55, 0x04, 0x0a] => o = Some(text),
                _ => {}
            }
        }
    }
    let parts: Vec<String> = [cn.map(|c| format!("CN={c}")), o.map(|o| format!("O={o}"))]
        .into_iter()
        .flatten()
        .collect();
    Some(if parts.is_empty() {
        "(no CN or O)".into()
    } else {
        parts.join(", ")
    })
}

/// The DER `SubjectPublicKeyInfo` of a certificate (tag and length included): what a key pin
/// hashes, so that a renewed certificate for the same key keeps the pin.
pub fn spki(der: &[u8]) -> Option<&[u8]> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r;
        let (_, _, r) = tlv(rest)?;
        rest = r;
    } else {
        rest = r;
    }
    // signature algorithm, issuer, validity, subject
    for _ in 0..4 {
        let (_, _, r) = tlv(rest)?;
        rest = r;
    }
    let (tag, _, r) = tlv(rest)?;
    (tag == 0x30).then(|| &rest[..rest.len() - r.len()])
}

/// The pin of a certificate's key: `sha256/<base64 of SHA-256(SPKI)>` (the HPKP notation, as
/// `curl --pinnedpubkey` takes it).
pub fn key_pin(der: &[u8]) -> Option<String> {
    use base64::Engine;
    use sha2::Digest;
    let digest = sha2::Sha256::digest(spki(der)?);
    Some(format!(
        "sha256/{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    ))
}

/// `(subject, issuer)` of a DER certificate, or `None` when it is not one.
pub fn names(der: &[u8]) -> Option<(String, String)> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r; // version
        let (_, _, r) = tlv(rest)?; // serial
        rest = r;
    } else {
        rest = r; // that was the serial
    }
    let (_, _, r) = tlv(rest)?; // signature algorithm
    let (_, issuer, r) = tlv(r)?;
    let (_, _, r) = tlv(r)?; // validity
    let (_, subject, _) = tlv(r)?;
    Some((name(subject)?, name(issuer)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_a_real_certificate_and_garbage() {
        // A self-signed certificate made with rcgen-like fields (CN=sallyport test, O=Sallyport).
        let pem = include_str!("../tests/data/test-cert.pem");
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (subject, issuer) = names(&der).unwrap();
        assert_eq!(subject, "CN=gw.example.com, O=Sallyport Test");
        assert_eq!(issuer, subject);
        let pin = key_pin(&der).unwrap();
        // openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64
        assert_eq!(pin, "sha256/jsBCSBzikJlwvFDPTbDM5iSZnBKAV0+59U+Wlb1kCb8=");
        assert_eq!(spki(&der).unwrap()[0], 0x30);
        for bad in [
            &b""[..],
            &[0x30],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x02, 0x30, 0x00],
        ] {
            assert!(names(bad).is_none());
        }
    }
}
