use isthmus_config::Secret;

use super::*;

fn config() -> MatrixAppserviceConfig {
    MatrixAppserviceConfig {
        homeserver: "http://127.0.0.1:1".into(),
        server_name: "example.org".into(),
        listen: "127.0.0.1:8095".into(),
        url: None,
        as_token: Secret::new("as-secret"),
        hs_token: Secret::new("hs-\"secret\""),
        sender_localpart: "isthmus".into(),
        user_prefix: "_xmpp_".into(),
    }
}

#[test]
fn puppet_names_escape_and_come_back() {
    assert_eq!(puppet_localpart("alice@localhost"), "alice=40localhost");
    assert_eq!(puppet_localpart("Al_ice@ex.org"), "_al__ice=40ex.org");
    assert_eq!(puppet_localpart("é@x"), "=c3=a9=40x");
    for jid in ["alice@localhost", "Al_ice@ex.org", "é@x", "a/b=c+d@x-y.z", "_@_"] {
        let local = puppet_localpart(jid);
        assert!(local.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'=')), "{local}");
        assert_eq!(jid_of_localpart(&local).as_deref(), Some(jid));
    }
    for bad in ["_A", "=4", "=zz", "a:b", "_1", "A"] {
        assert_eq!(jid_of_localpart(bad), None, "{bad}");
    }
}

#[test]
fn puppets_and_the_bot_are_recognised() {
    let (sink, _stream) = EventSink::channel(4);
    let fetcher = Arc::new(crate::media::Fetcher::new(false));
    let p = Portals::new(NetworkId::new("matrix"), Acting::Appservice(config()), Vec::new(), sink, fetcher);
    assert_eq!(p.bot(), "@isthmus:example.org");
    assert_eq!(p.puppet_of("alice@localhost").unwrap().as_deref(), Some("@_xmpp_alice=40localhost:example.org"));
    assert_eq!(p.puppet_jid("@_xmpp_alice=40localhost:example.org").as_deref(), Some("alice@localhost"));
    assert!(!p.is_puppet("@_xmpp_alice=40localhost:other.org"));
    assert!(!p.is_puppet("@alice:example.org"));
    assert!(p.is_ours("@isthmus:example.org"));
    assert!(p.puppet_of(&format!("{}@x", "a".repeat(300))).is_err());
}

#[test]
fn registration_is_yaml_with_an_escaped_exclusive_namespace() {
    let yaml = registration_yaml("matrix.example.org", &config());
    assert_eq!(
        yaml,
        "# Isthmus application service for portal rooms (matrix.example.org).\n\
         # List this file in the homeserver's `app_service_config_files` and restart it.\n\
         id: \"matrix.example.org\"\n\
         url: \"http://127.0.0.1:8095\"\n\
         as_token: \"as-secret\"\n\
         hs_token: \"hs-\\\"secret\\\"\"\n\
         sender_localpart: \"isthmus\"\n\
         rate_limited: false\n\
         receive_ephemeral: true\n\
         namespaces:\n  users:\n    - exclusive: true\n      regex: \"^@_xmpp_.*:example\\\\.org$\"\n  aliases: []\n  rooms: []\n"
    );
    let mut c = config();
    c.url = Some("https://gw.example.org/as".into());
    c.user_prefix = "x+".into();
    c.server_name = "[::1]:8448".into();
    let yaml = registration_yaml("m", &c);
    assert!(yaml.contains("url: \"https://gw.example.org/as\"\n"), "{yaml}");
    assert!(yaml.contains(r#"regex: "^@x\\+.*:\\[::1\\]:8448$""#), "{yaml}");
}

#[test]
fn routes() {
    assert_eq!(route(&Method::PUT, "/_matrix/app/v1/transactions/123"), Route::Transaction("123".into()));
    assert_eq!(route(&Method::PUT, "/transactions/a%2Fb"), Route::Transaction("a/b".into()));
    assert_eq!(
        route(&Method::GET, "/_matrix/app/v1/users/%40_xmpp_a%3Alocalhost"),
        Route::User("@_xmpp_a:localhost".into())
    );
    assert_eq!(route(&Method::GET, "/_matrix/app/v1/rooms/%23r%3Ax"), Route::Room("#r:x".into()));
    assert_eq!(route(&Method::POST, "/_matrix/app/v1/ping"), Route::Ping);
    for (m, p) in [
        (Method::GET, "/_matrix/app/v1/transactions/1"),
        (Method::PUT, "/_matrix/app/v1/transactions/"),
        (Method::PUT, "/_matrix/app/v1/transactions/1/2"),
        (Method::GET, "/"),
        (Method::GET, "/_matrix/app/v1/users/%zz"),
    ] {
        assert_eq!(route(&m, p), Route::Unknown, "{m} {p}");
    }
}

#[test]
fn only_the_homeservers_token_is_accepted() {
    let mut h = HeaderMap::new();
    assert_eq!(authorize(&h, None, "tok"), Err(StatusCode::UNAUTHORIZED));
    assert_eq!(authorize(&h, Some("x=1"), "tok"), Err(StatusCode::UNAUTHORIZED));
    assert_eq!(authorize(&h, Some("access_token=tok"), "tok"), Ok(()));
    assert_eq!(authorize(&h, Some("a=b&access_token=t%6Fk"), "tok"), Ok(()));
    assert_eq!(authorize(&h, Some("access_token=other"), "tok"), Err(StatusCode::FORBIDDEN));
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer tok"));
    assert_eq!(authorize(&h, None, "tok"), Ok(()));
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer tok2"));
    assert_eq!(authorize(&h, Some("access_token=tok"), "tok"), Err(StatusCode::FORBIDDEN));
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dG9r"));
    assert_eq!(authorize(&h, None, "tok"), Err(StatusCode::UNAUTHORIZED));
}

#[test]
fn transactions_are_read_and_remembered() {
    let t = parse_transaction(br#"{"events": [{"type": "m.room.message"}, 5], "ephemeral": [{"type": "m.typing"}]}"#)
        .unwrap();
    assert_eq!(t.events, vec![json!({"type": "m.room.message"})]);
    assert_eq!(t.ephemeral, vec![json!({"type": "m.typing"})]);
    let t = parse_transaction(br#"{"events": [], "de.sorunome.msc2409.ephemeral": [{"type": "m.receipt"}]}"#).unwrap();
    assert_eq!(t.ephemeral.len(), 1);
    assert_eq!(parse_transaction(b"{}").unwrap(), Transaction::default());
    assert!(parse_transaction(b"[]").is_err());
    assert!(parse_transaction(b"{\"events\": {}}").is_err());
    assert!(parse_transaction(b"nope").is_err());
    let mut seen = SeenTransactions::default();
    seen.insert("1");
    seen.insert("1");
    assert!(seen.contains("1") && !seen.contains("2"));
    for i in 0..REMEMBERED_TRANSACTIONS {
        seen.insert(&format!("n{i}"));
    }
    assert!(!seen.contains("1"), "the oldest ids are forgotten");
    assert!(seen.contains(&format!("n{}", REMEMBERED_TRANSACTIONS - 1)));
}

fn state_event(kind: &str, key: &str, sender: &str, content: Value) -> Value {
    json!({"type": kind, "state_key": key, "sender": sender, "content": content})
}

#[test]
fn members_nicks_and_powers_come_from_the_state() {
    let state = vec![
        state_event("m.room.create", "", "@bob:l", json!({"room_version": "10"})),
        state_event(
            "m.room.power_levels",
            "",
            "@bob:l",
            json!({"users": {"@bob:l": 100, "@mod:l": "50"}, "users_default": 0}),
        ),
        state_event("m.room.topic", "", "@bob:l", json!({"topic": "Welcome"})),
        state_event("m.room.member", "@bob:l", "@bob:l", json!({"membership": "join", "displayname": "Bob"})),
        state_event("m.room.member", "@mod:l", "@mod:l", json!({"membership": "join", "displayname": "Bob"})),
        state_event("m.room.member", "@plain:l", "@plain:l", json!({"membership": "join"})),
        state_event("m.room.member", "@gone:l", "@gone:l", json!({"membership": "leave", "displayname": "G"})),
    ];
    let members = joined_members(&state);
    assert_eq!(members.len(), 3);
    assert_eq!(nick_in(&members, "@bob:l"), "Bob (@bob:l)");
    assert_eq!(nick_in(&members, "@mod:l"), "Bob (@mod:l)");
    assert_eq!(nick_in(&members, "@plain:l"), "plain");
    assert_eq!(nick_in(&members, "@stranger:l"), "@stranger:l");
    assert_eq!(topic_of(&state).as_deref(), Some("Welcome"));
    let p = Powers::from_state(&state);
    let o = p.occupant("@bob:l", "Bob".into());
    assert_eq!((o.role, o.affiliation), (Role::Moderator, Affiliation::Owner));
    let o = p.occupant("@mod:l", "M".into());
    assert_eq!((o.role, o.affiliation), (Role::Moderator, Affiliation::Admin));
    let o = p.occupant("@plain:l", "p".into());
    assert_eq!((o.role, o.affiliation), (Role::Participant, Affiliation::Member));
    // Room version 12: the creators outrank everyone without being listed.
    let v12 = vec![
        state_event("m.room.create", "", "@c:l", json!({"room_version": "12", "additional_creators": ["@d:l"]})),
        state_event("m.room.power_levels", "", "@c:l", json!({"users": {}})),
    ];
    let p = Powers::from_state(&v12);
    assert_eq!(p.occupant("@d:l", "d".into()).affiliation, Affiliation::Owner);
    assert_eq!(p.occupant("@e:l", "e".into()).affiliation, Affiliation::Member);
    // No power levels at all: the creator may do everything.
    let p = Powers::from_state(&[state_event("m.room.create", "", "@c:l", json!({"room_version": "10"}))]);
    assert_eq!((p.level("@c:l"), p.level("@e:l")), (100, 0));
}

#[test]
fn the_bot_speaks_for_a_nick() {
    let m = spoken_by("Al<ice>", &Message::text("*hi*"));
    assert_eq!(m.body, "<Al<ice>> *hi*");
    // The HTML body is the styling's, made from that prefixed body (escaped).
    assert_eq!(outgoing::message_content(&m)["formatted_body"], json!("&lt;Al&lt;ice&gt;&gt; <strong>hi</strong>"));
    let html = Message {
        formatted: Some(isthmus_core::model::FormattedBody {
            format: isthmus_core::model::TextFormat::Html,
            text: "<b>hi</b>".into(),
        }),
        ..Message::text("hi")
    };
    assert_eq!(spoken_by("a&b", &html).formatted.map(|f| f.text).as_deref(), Some("&lt;a&amp;b&gt; <b>hi</b>"));
    let action = spoken_by("Alice", &Message { action: true, ..Message::text("waves") });
    assert_eq!(action.body, "Alice waves");
}

#[test]
fn transaction_ids_follow_personal_mode() {
    let mut e = Event::new(
        NetworkId::xmpp(),
        ChatRef::room(NetworkId::new("matrix"), "!r:l"),
        Sender::new("a@l", "A"),
        EventKind::Message(Message::text("x")),
    );
    e.key = isthmus_core::model::MessageKey("k".into());
    assert_eq!(transaction_id(&e), "k-message");
    e.kind = EventKind::Retraction { target: MessageRef("$t".into()), moderator: None, reason: None };
    assert_eq!(transaction_id(&e), "k-retraction");
    let e = e.with_origin_id("o1");
    assert_eq!(transaction_id(&e), "k-retraction-o1");
}
