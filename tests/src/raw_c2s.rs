//! A raw XMPP client stream for tests that need to control every byte of a
//! login: the stream header, STARTTLS (trusting exactly the certificate the
//! server under test generated) and SCRAM with a chosen GS2 header, driven by
//! the `sasl` crate's client.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sasl::client::Mechanism;
use sasl::client::mechanisms::Scram;
use sasl::common::scram::{Sha1, Sha256};
use sasl::common::{ChannelBinding, Credentials};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::scenario::T;

pub const HEADER: &str = "<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";
const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";

/// One client stream; `features` holds the last `<stream:features/>` received.
pub struct RawC2s<S> {
    io: S,
    pub features: String,
}

/// Read from `io` until `needle` shows up or the peer closes; returns all read.
pub async fn read_until(io: &mut (impl AsyncRead + Unpin), needle: &str) -> Result<String> {
    read_until_any(io, &[needle]).await
}

/// Read from `io` until one of `needles` shows up or the peer closes; returns all read.
pub async fn read_until_any(io: &mut (impl AsyncRead + Unpin), needles: &[&str]) -> Result<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + T;
    while !needles.iter().any(|n| String::from_utf8_lossy(&got).contains(n)) {
        let n = tokio::time::timeout_at(deadline, io.read(&mut buf))
            .await
            .with_context(|| format!("waiting for {needles:?}; got {}", String::from_utf8_lossy(&got)))??;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

impl RawC2s<TcpStream> {
    /// Connect to the embedded server on `port` and read its first features.
    pub async fn connect(port: u16) -> Result<RawC2s<TcpStream>> {
        let mut io = TcpStream::connect(("127.0.0.1", port)).await?;
        io.write_all(HEADER.as_bytes()).await?;
        let features = read_until(&mut io, "</stream:features>").await?;
        Ok(RawC2s { io, features })
    }

    /// STARTTLS, trusting only the certificate in `cert_file`, then a new stream.
    pub async fn starttls(
        mut self,
        cert_file: &std::path::Path,
    ) -> Result<RawC2s<tokio_rustls::client::TlsStream<TcpStream>>> {
        self.io.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>").await?;
        let proceed = read_until(&mut self.io, "proceed").await?;
        if !proceed.contains("proceed") {
            bail!("no <proceed/>: {proceed}");
        }
        let pinned = CertificateDer::from_pem_file(cert_file).context("read the server's certificate")?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { cert: pinned, provider }))
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let mut io = connector.connect(ServerName::try_from("localhost")?, self.io).await?;
        io.write_all(HEADER.as_bytes()).await?;
        let features = read_until(&mut io, "</stream:features>").await?;
        Ok(RawC2s { io, features })
    }
}

/// Log `user@localhost/resource` in over STARTTLS with SCRAM-SHA-256 and bind,
/// reading through a receive buffer of `recv_buffer` bytes (small, to stop
/// reading soon after).
pub async fn log_in(
    port: u16,
    cert_file: &std::path::Path,
    user: &str,
    password: &str,
    resource: &str,
    recv_buffer: u32,
) -> Result<RawC2s<tokio_rustls::client::TlsStream<TcpStream>>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(recv_buffer)?;
    let mut io = socket.connect(([127, 0, 0, 1], port).into()).await?;
    io.write_all(HEADER.as_bytes()).await?;
    let features = read_until(&mut io, "</stream:features>").await?;
    let mut c = RawC2s { io, features }.starttls(cert_file).await?;
    if let Err(failure) = c.scram("SCRAM-SHA-256", user, password, ChannelBinding::None).await? {
        bail!("login refused: {failure}");
    }
    c.send(HEADER).await?;
    c.read_until("</stream:features>").await?;
    c.send(&format!(
        "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
    ))
    .await?;
    let bound = c.read_until("</iq>").await?;
    if bound.contains("type=\"error\"") || bound.contains("type='error'") {
        bail!("bind refused: {bound}");
    }
    c.send("<presence/>").await?;
    Ok(c)
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawC2s<S> {
    pub async fn send(&mut self, xml: &str) -> Result<()> {
        self.io.write_all(xml.as_bytes()).await?;
        Ok(())
    }

    pub async fn read_until(&mut self, needle: &str) -> Result<String> {
        read_until(&mut self.io, needle).await
    }

    /// A SCRAM login (`SCRAM-SHA-1` or `SCRAM-SHA-256`) whose GS2 header is
    /// `binding`'s (`n,,` for [`ChannelBinding::None`], `y,,` for
    /// `Unsupported`). `Ok(Ok(()))`: `<success/>` with a server signature the
    /// client verified; `Ok(Err(failure))`: the server's `<failure/>`.
    pub async fn scram(
        &mut self,
        mechanism: &str,
        user: &str,
        password: &str,
        binding: ChannelBinding,
    ) -> Result<std::result::Result<(), String>> {
        let creds = Credentials::default().with_username(user).with_password(password).with_channel_binding(binding);
        let mut client: Box<dyn Mechanism> = match mechanism {
            "SCRAM-SHA-1" => Box::new(Scram::<Sha1>::from_credentials(creds)?),
            _ => Box::new(Scram::<Sha256>::from_credentials(creds)?),
        };
        let first = B64.encode(client.initial());
        self.send(&format!("<auth xmlns='{SASL}' mechanism='{mechanism}'>{first}</auth>")).await?;
        let answer = read_until_any(&mut self.io, &["</challenge>", "</failure>", "</stream:stream>"]).await?;
        let Some(challenge) = element_text(&answer, "challenge") else {
            return Ok(Err(answer));
        };
        let response = client.response(&B64.decode(challenge)?)?;
        self.send(&format!("<response xmlns='{SASL}'>{}</response>", B64.encode(response))).await?;
        let verdict = read_until_any(&mut self.io, &["</success>", "</failure>", "</stream:stream>"]).await?;
        match element_text(&verdict, "success") {
            Some(data) => {
                client.success(&B64.decode(data)?).context("the server's signature is wrong")?;
                Ok(Ok(()))
            }
            None => Ok(Err(verdict)),
        }
    }
}

/// The text of the first `<name …>text</name>` in `xml`.
fn element_text(xml: &str, name: &str) -> Option<String> {
    let start = xml.find(&format!("<{name}"))?;
    let open_end = start + xml[start..].find('>')? + 1;
    let close = open_end + xml[open_end..].find(&format!("</{name}>"))?;
    Some(xml[open_end..close].trim().to_owned())
}

/// Trusts exactly one certificate, whatever it says of itself.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the server's generated certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
