//! People's profiles from Matrix on XMPP: a Matrix user's display name and picture
//! reach an XMPP user as the occupant's vCard (XEP-0054) and as the avatar hash
//! in the occupant's presence (XEP-0153), fetched through the XMPP user's own
//! Matrix account; the occupant item carries the person's real JID (their puppet).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use isthmus_tests::matrix_scenario::{MatrixSetup, matrix_jid};
use isthmus_tests::scenario::T;
use serde_json::json;
use sha1::Digest;

/// A 1×1 PNG.
const PICTURE_B64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

/// The text of the first `<tag>…</tag>` in some XML.
fn text_of<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    Some(&xml[start..start + xml[start..].find(&format!("</{tag}>"))?])
}

#[tokio::test]
async fn matrix_display_name_and_picture_reach_the_occupants_vcard_and_presence() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let picture = base64::engine::general_purpose::STANDARD.decode(PICTURE_B64)?;
    let hash: String = sha1::Sha1::digest(&picture).iter().map(|b| format!("{b:02x}")).collect();
    let mxc = s.bob.upload(&picture, "image/png", "bob.png").await?;
    let path = format!("/_matrix/client/v3/profile/{}/avatar_url", isthmus_tests::matrix::encode(s.bob.user_id()));
    s.bob.call(reqwest::Method::PUT, &path, Some(&json!({"avatar_url": mxc}))).await?;

    let mut alice = s.alice_linked("phone").await?;
    let room = s.bob.create_room(Some("Profiles"), &[&s.alice_mx.user_id], false).await?;
    let room_jid = matrix_jid(&room)?;
    alice.join(&room_jid, "Alice").await?;
    let occupant = format!("{room_jid}/Bob Matrix");
    let bob_jid = matrix_jid(s.bob.user_id())?;

    // bob's presence: his real JID, and once his profile is known, his picture's hash
    let with_hash = alice
        .expect(Duration::from_secs(60), |st| {
            st.kind == "presence" && st.from == occupant && st.xml.contains(&format!("<photo>{hash}</photo>"))
        })
        .await
        .with_context(|| s.log_tail())?;
    assert!(with_hash.xml.contains(&format!("jid=\"{bob_jid}\"")), "real JID: {}", with_hash.xml);

    // the occupant's vCard and the person's: the display name and the same bytes
    for (id, to) in [("v1", occupant.clone()), ("v2", bob_jid.clone())] {
        alice.send_raw(&format!("<iq type='get' id='{id}' to='{to}'><vCard xmlns='vcard-temp'/></iq>")).await?;
        let vcard = alice.expect(T, |st| st.kind == "iq" && st.id == id).await?;
        if vcard.type_ != "result" {
            bail!("vCard of {to}: {}", vcard.xml);
        }
        assert_eq!(text_of(&vcard.xml, "NICKNAME"), Some("Bob Matrix"), "{}", vcard.xml);
        assert_eq!(text_of(&vcard.xml, "TYPE"), Some("image/png"), "{}", vcard.xml);
        let binval: String =
            text_of(&vcard.xml, "BINVAL").context("a picture")?.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD.decode(binval)?;
        assert_eq!(bytes, picture, "the picture bob set on Matrix, byte for byte");
    }
    Ok(())
}
