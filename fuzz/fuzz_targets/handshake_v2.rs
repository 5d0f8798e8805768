//! Version 2's handshake messages as each side reads them from the network
//! (`tunnel::handshake`): the gateway reading msg1 (anonymous: the `sallyport-hello` header or
//! the fallback's create body) and msg3, the agent reading msg2 (the `101` header or the create
//! answer, possibly from whoever is on the path) and the sealed verdict.
//!
//! Byte 0 picks the message; the rest is it. The keys and token are fixed, so msg2, msg3 and
//! the verdict are read in a genuine handshake's state. Per input: `Ok` or `Err`, never a panic;
//! garbage never passes (AEAD tags are out of reach): msg1 that is not the genuine one may only
//! be accepted when it is well-formed for the gateway's key, msg3 and verdicts made up by the
//! fuzzer are refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tunnel::handshake::{open_verdict, Binding, Initiator, Offer, Responder, Role};
use tunnel::inner::KeyPair;
use tunnel::token::{Claims, Issuer, Kind, Token};

struct Fixed {
    gw: KeyPair,
    token: Token,
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let gw = KeyPair::from_private([0x5a; 32]);
        let issuer = Issuer::from_seed([0x17; 32]);
        let token = Token::mint(
            &issuer,
            Claims {
                kind: Kind::Agent,
                id: "fuzz".into(),
                name: None,
                groups: vec![],
                routes: vec![],
                issued_at: 1,
                not_before: None,
                expires: Some(u64::MAX),
                agent_key: [0; 32],
                gateway_keys: vec![gw.public().0],
                deployment: None,
                issuer: [0; 32],
            },
        )
        .expect("mint");
        Fixed { gw, token }
    })
}

fn offer() -> Offer {
    Offer {
        exporter: true,
        trust_lb: false,
        time: 0,
        tls_keys: vec![[1; 32]],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, input)) = data.split_first() else {
        return;
    };
    let f = fixed();
    let keys = [&f.gw];
    match which % 4 {
        0 => {
            let _ = Responder::read1(&keys, Role::Agent, input, &offer());
            let _ = Responder::read1(&keys, Role::Connector, input, &offer());
        }
        1 => {
            let (init, m1) = Initiator::start(&f.token, Role::Agent, &f.gw.public().0, &[]).unwrap();
            let (resp, _m2) = Responder::read1(&keys, Role::Agent, &m1, &offer()).unwrap();
            drop(init);
            assert!(resp.read3(input).is_err(), "a made-up msg3 was accepted");
        }
        2 => {
            let (init, _m1) = Initiator::start(&f.token, Role::Agent, &f.gw.public().0, &[]).unwrap();
            assert!(init.read2(input).is_err(), "a made-up msg2 was accepted");
        }
        _ => {
            let (init, m1) = Initiator::start(&f.token, Role::Agent, &f.gw.public().0, &[]).unwrap();
            let (resp, m2) = Responder::read1(&keys, Role::Agent, &m1, &offer()).unwrap();
            let (i2, _) = init.read2(&m2).unwrap();
            let (cipher, m3) = i2.finish(&f.token, &Binding::default()).unwrap();
            resp.read3(&m3).unwrap();
            let (_, mut opener) = cipher.split();
            assert!(
                open_verdict(&mut opener, input).is_err(),
                "a made-up verdict was accepted"
            );
        }
    }
});
