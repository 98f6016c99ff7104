//! The server side of SCRAM (RFC 5802, RFC 7677): SCRAM-SHA-1 and
//! SCRAM-SHA-256 without channel binding, for the embedded server.
//!
//! The exchange is written here; the hashing (`Hi`, HMAC, H) is the `sasl`
//! crate's. That crate's server mechanism refuses the GS2 header `n,,` — what a
//! client sends when it does not support channel binding (RFC 5802 §6), which
//! is most of them — so correct passwords were refused; it also compares proofs
//! in variable time and never checks the nonce or the channel-binding echo of
//! the final message. Here:
//!
//! - GS2 headers `n,,` and `y,,` are accepted (this server offers no `-PLUS`
//!   mechanism, so `y` is no downgrade); `p=…` is refused; an authorization
//!   identity is returned for the caller to check.
//! - An unknown account goes through the same steps with a salt derived from a
//!   per-process key and the user name (stable for the process, so a second try
//!   shows the same salt) and fails at the proof, as a wrong password does.
//! - Every field is parsed strictly, with a bound on the message sizes.

use std::marker::PhantomData;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sasl::common::scram::ScramProvider;
use subtle::ConstantTimeEq;
use thiserror::Error;

/// Longest client message taken (a real one is under 200 bytes).
pub const MAX_MESSAGE: usize = 4096;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not offered here: use SCRAM without -PLUS")]
    ChannelBinding,
    #[error("wrong user name or password")]
    AuthenticationFailed,
}

/// The client's first message, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFirst {
    /// `n,,`, `y,,` or with an authorization identity (`n,a=…,`).
    gs2_header: String,
    /// The message without its GS2 header (part of the signed AuthMessage).
    bare: String,
    /// The authentication identity (`n=`), unescaped.
    pub username: String,
    /// The authorization identity (`a=`), unescaped, if any.
    pub authzid: Option<String>,
    nonce: String,
}

/// `saslname` (RFC 5802 §5.1): `=2C` is `,` and `=3D` is `=`; any other `=` is an error.
fn unescape_name(s: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3).ok_or(ScramError::Malformed("bad escape in a name"))?;
        out.push(match code {
            "2C" => ',',
            "3D" => '=',
            _ => return Err(ScramError::Malformed("bad escape in a name")),
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

fn printable_nonce(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Parse `gs2-header client-first-message-bare`.
pub fn parse_client_first(message: &[u8]) -> Result<ClientFirst, ScramError> {
    if message.len() > MAX_MESSAGE {
        return Err(ScramError::Malformed("message too long"));
    }
    let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    let mut parts = text.splitn(3, ',');
    let flag = parts.next().unwrap_or_default();
    let authz = parts.next().ok_or(ScramError::Malformed("no GS2 header"))?;
    let bare = parts.next().ok_or(ScramError::Malformed("no GS2 header"))?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("bad channel-binding flag")),
    }
    let authzid = match authz {
        "" => None,
        a => Some(unescape_name(a.strip_prefix("a=").ok_or(ScramError::Malformed("bad authorization identity"))?)?),
    };
    let mut fields = bare.split(',');
    let first = fields.next().unwrap_or_default();
    if first.starts_with("m=") {
        return Err(ScramError::Malformed("mandatory extensions are not supported"));
    }
    let username = unescape_name(first.strip_prefix("n=").ok_or(ScramError::Malformed("no user name"))?)?;
    let nonce = fields.next().and_then(|f| f.strip_prefix("r=")).ok_or(ScramError::Malformed("no nonce"))?;
    if username.is_empty() || !printable_nonce(nonce) {
        return Err(ScramError::Malformed("empty user name or bad nonce"));
    }
    Ok(ClientFirst {
        gs2_header: format!("{flag},{authz},"),
        bare: bare.to_owned(),
        username,
        authzid,
        nonce: nonce.to_owned(),
    })
}

/// What the server knows of the account: its salted password (`Hi(password, salt, i)`).
pub struct StoredSecret<'a> {
    pub salt: &'a [u8],
    pub iterations: u32,
    pub salted_password: &'a [u8],
}

/// One exchange after the client's first message, waiting for its final one.
pub struct Exchange<S: ScramProvider> {
    first: ClientFirst,
    server_first: String,
    server_nonce: String,
    /// `None` for an unknown account: the proof can never match.
    salted_password: Option<Vec<u8>>,
    _hash: PhantomData<S>,
}

impl<S: ScramProvider> Exchange<S> {
    /// Answer the client's first message. `secret` is `None` for an unknown
    /// account; `fake_key` (secret, per process) and `iterations` make its
    /// salt and count look like a real account's.
    pub fn start(
        first: ClientFirst,
        secret: Option<StoredSecret<'_>>,
        fake_key: &[u8],
        iterations: u32,
    ) -> (Exchange<S>, Vec<u8>) {
        let mut extra = [0u8; 18];
        rand::Rng::fill(&mut rand::rng(), &mut extra[..]);
        let server_nonce = format!("{}{}", first.nonce, B64.encode(extra));
        let (salt, iterations, salted_password) = match secret {
            Some(s) => (s.salt.to_vec(), s.iterations, Some(s.salted_password.to_vec())),
            None => {
                let mut salt = S::hmac(format!("fake salt\0{}", first.username.to_lowercase()).as_bytes(), fake_key)
                    .unwrap_or_default();
                salt.truncate(16);
                (salt, iterations, None)
            }
        };
        let server_first = format!("r={server_nonce},s={},i={iterations}", B64.encode(salt));
        let message = server_first.clone().into_bytes();
        (Exchange { first, server_first, server_nonce, salted_password, _hash: PhantomData }, message)
    }

    /// Check the client's final message; on success, the server's final
    /// message (`v=…`) to send with `<success/>`.
    pub fn finish(self, message: &[u8]) -> Result<Vec<u8>, ScramError> {
        if message.len() > MAX_MESSAGE {
            return Err(ScramError::Malformed("message too long"));
        }
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed("no proof"))?;
        let mut fields = without_proof.split(',');
        let binding = fields.next().and_then(|f| f.strip_prefix("c=")).ok_or(ScramError::Malformed("no c="))?;
        let nonce = fields.next().and_then(|f| f.strip_prefix("r=")).ok_or(ScramError::Malformed("no nonce"))?;
        if B64.decode(binding).ok().as_deref() != Some(self.first.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed("the channel-binding echo does not match the GS2 header"));
        }
        if nonce != self.server_nonce {
            return Err(ScramError::Malformed("the nonce does not match"));
        }
        let proof = B64.decode(proof).map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let auth_message = format!("{},{},{}", self.first.bare, self.server_first, without_proof);
        let hmac = |data: &[u8], key: &[u8]| S::hmac(data, key).map_err(|_| ScramError::AuthenticationFailed);
        // An unknown account computes with a random key, so it costs the same and never matches.
        let unknown: [u8; 32] = rand::random();
        let salted = self.salted_password.as_deref().unwrap_or(&unknown);
        let client_key = hmac(b"Client Key", salted)?;
        let stored_key = S::hash(&client_key);
        let signature = hmac(auth_message.as_bytes(), &stored_key)?;
        let expected: Vec<u8> = client_key.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        let matches: bool = expected.ct_eq(&proof).into();
        if !matches || self.salted_password.is_none() {
            return Err(ScramError::AuthenticationFailed);
        }
        let server_key = hmac(b"Server Key", salted)?;
        let server_signature = hmac(auth_message.as_bytes(), &server_key)?;
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sasl::client::Mechanism as _;
    use sasl::client::mechanisms::Scram as ClientScram;
    use sasl::common::scram::{Sha1, Sha256};
    use sasl::common::{ChannelBinding, Credentials, Password};

    const SALT: &[u8] = b"0123456789abcdef";

    fn salted<S: ScramProvider>(password: &str) -> Vec<u8> {
        S::derive(&Password::Plain(password.into()), SALT, 4096).expect("derive")
    }

    /// A full exchange driven by the `sasl` crate's client; returns the server's verdict.
    fn run<S: ScramProvider>(user: &str, password: &str, stored: Option<&[u8]>) -> Result<(), ScramError> {
        run_with::<S>(user, password, stored, ChannelBinding::None)
    }

    fn run_with<S: ScramProvider>(
        user: &str,
        password: &str,
        stored: Option<&[u8]>,
        binding: ChannelBinding,
    ) -> Result<(), ScramError> {
        let creds = Credentials::default().with_username(user).with_password(password).with_channel_binding(binding);
        let mut client = ClientScram::<S>::from_credentials(creds).expect("client");
        let first = client.initial();
        let (exchange, server_first) = Exchange::<S>::start(
            parse_client_first(&first)?,
            stored.map(|s| StoredSecret { salt: SALT, iterations: 4096, salted_password: s }),
            b"key",
            4096,
        );
        let last = client.response(&server_first).expect("client final");
        let server_final = exchange.finish(&last)?;
        client.success(&server_final).expect("the client accepts the server's signature");
        Ok(())
    }

    #[test]
    fn a_client_without_channel_binding_logs_in() {
        // A client without channel binding sends `n,,`, as most clients do.
        let creds = Credentials::default()
            .with_username("alice")
            .with_password("pw")
            .with_channel_binding(ChannelBinding::None);
        let first = ClientScram::<Sha256>::from_credentials(creds).expect("client").initial();
        assert!(first.starts_with(b"n,,"), "{}", String::from_utf8_lossy(&first));
        assert_eq!(run::<Sha256>("alice", "pw", Some(&salted::<Sha256>("pw"))), Ok(()));
        assert_eq!(run::<Sha1>("alice", "pw", Some(&salted::<Sha1>("pw"))), Ok(()));
        // and one that could bind but sees no -PLUS mechanism sends `y,,`
        let stored = salted::<Sha256>("pw");
        assert_eq!(run_with::<Sha256>("alice", "pw", Some(&stored), ChannelBinding::Unsupported), Ok(()));
    }

    #[test]
    fn wrong_passwords_and_unknown_accounts_fail_alike() {
        let stored = salted::<Sha256>("pw");
        assert_eq!(run::<Sha256>("alice", "nope", Some(&stored)), Err(ScramError::AuthenticationFailed));
        assert_eq!(run::<Sha256>("nobody", "pw", None), Err(ScramError::AuthenticationFailed));
    }

    #[test]
    fn an_unknown_account_gets_a_stable_salt_and_the_usual_count() {
        let salt_of = |user: &str| {
            let first = parse_client_first(format!("n,,n={user},r=abc").as_bytes()).expect("parse");
            let (_, message) = Exchange::<Sha256>::start(first, None, b"process key", 10_000);
            let text = String::from_utf8(message).expect("utf-8");
            assert!(text.ends_with(",i=10000"), "{text}");
            text.split(',').find_map(|f| f.strip_prefix("s=")).map(str::to_owned).expect("salt")
        };
        assert_eq!(salt_of("ghost"), salt_of("ghost"));
        assert_ne!(salt_of("ghost"), salt_of("other"));
        assert_eq!(B64.decode(salt_of("ghost")).expect("base64").len(), 16);
    }

    #[test]
    fn first_messages_are_parsed_strictly() {
        let ok = parse_client_first(b"y,a=bob@x,n=a=2Cb=3Dc,r=nonce").expect("valid");
        assert_eq!((ok.username.as_str(), ok.authzid.as_deref()), ("a,b=c", Some("bob@x")));
        assert_eq!(parse_client_first(b"p=tls-exporter,,n=a,r=x"), Err(ScramError::ChannelBinding));
        for bad in [
            &b"n,,r=x"[..],
            b"n,n=a,r=x",
            b"x,,n=a,r=x",
            b"n,,m=ext,n=a,r=x",
            b"n,,n=a=2X,r=x",
            b"n,,n=,r=x",
            b"n,,n=a,r=",
            b"n,,n=a",
            b"n,b=c,n=a,r=x",
            b"\xff,,n=a,r=x",
        ] {
            assert!(
                matches!(parse_client_first(bad), Err(ScramError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(parse_client_first(&vec![b'a'; MAX_MESSAGE + 1]), Err(ScramError::Malformed(_))));
    }

    #[test]
    fn final_messages_must_echo_the_header_and_the_nonce() {
        let stored = salted::<Sha256>("pw");
        let start = || {
            let first = parse_client_first(b"n,,n=alice,r=abc").expect("parse");
            Exchange::<Sha256>::start(
                first,
                Some(StoredSecret { salt: SALT, iterations: 4096, salted_password: &stored }),
                b"k",
                4096,
            )
        };
        let nonce_of = |server_first: Vec<u8>| {
            let text = String::from_utf8(server_first).expect("utf-8");
            text.split(',').next().and_then(|r| r.strip_prefix("r=")).expect("nonce").to_owned()
        };
        let (exchange, server_first) = start();
        // `eSws` is base64("y,,"): not the header this client sent
        let bad_binding = format!("c=eSws,r={},p=AAAA", nonce_of(server_first));
        assert!(matches!(exchange.finish(bad_binding.as_bytes()), Err(ScramError::Malformed(_))));
        let (exchange, _) = start();
        assert!(matches!(exchange.finish(b"c=biws,r=abcother,p=AAAA"), Err(ScramError::Malformed(_))));
        let (exchange, _) = start();
        assert!(matches!(exchange.finish(b"c=biws,r=abc"), Err(ScramError::Malformed(_))));
        let (exchange, server_first) = start();
        let wrong_proof = format!("c=biws,r={},p=AAAA", nonce_of(server_first));
        assert_eq!(exchange.finish(wrong_proof.as_bytes()), Err(ScramError::AuthenticationFailed));
    }
}
