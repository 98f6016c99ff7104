//! The store's behaviour, written once and run against every backend
//! (SQLite here; PostgreSQL from the end-to-end test crate with feature `test-support`).
//! The store must be freshly created: every run starts from an empty database.

use super::*;

/// Run every check against `store` (migrates it first).
pub async fn run_all(store: &Store) {
    store.migrate().await.expect("migrate");
    store.migrate().await.expect("migrating twice is a no-op");
    puppets(store).await;
    rooms_and_portals(store).await;
    accounts(store).await;
    message_map(store).await;
    archive_visibility(store).await;
    archive_paging(store).await;
    archive_filters_and_expiry(store).await;
    local_users_and_rosters(store).await;
    outbox(store).await;
    room_sessions(store).await;
    user_settings(store).await;
    // Last: it seals every value the checks above left in clear.
    sealed_secrets(store).await;
}

/// With a key, credentials are sealed in their columns (bound to their row), opened
/// on reading; values in clear are sealed once by `seal_existing`; another key is refused.
async fn sealed_secrets(store: &Store) {
    use crate::secrets::{self, SecretBox};
    let key = SecretBox::new(&[9; secrets::KEY_LEN]);
    let keyed = store.clone().with_secrets(key.clone());
    let raw_credentials = |jid: &'static str| async move {
        let row = sqlx::query("SELECT credentials FROM accounts WHERE xmpp_jid = $1")
            .bind(jid)
            .fetch_one(&store.pool)
            .await
            .expect("raw account");
        row.try_get::<Option<Vec<u8>>, _>("credentials").expect("credentials").unwrap_or_default()
    };
    let raw_text = |sql: &'static str, a: &'static str| async move {
        let row = sqlx::query(sql).bind(a).fetch_one(&store.pool).await.expect("raw row");
        row.try_get::<String, _>(0).expect("text")
    };

    // Written through the keyed store: sealed at rest, opened on reading.
    let token = "syt_c2VjcmV0_token";
    let a = AccountRecord {
        xmpp_jid: "sealed@localhost".into(),
        network: "matrix".into(),
        remote_user: "@sealed:m.org".into(),
        credentials: format!("{{\"access_token\":\"{token}\"}}").into_bytes(),
        settings: "{}".into(),
        updated_us: 1,
    };
    keyed.upsert_account(&a).await.expect("account");
    let raw = raw_credentials("sealed@localhost").await;
    assert!(secrets::is_sealed(&raw) && !raw.windows(token.len()).any(|w| w == token.as_bytes()));
    assert_eq!(keyed.account("sealed@localhost", "matrix").await.expect("get"), Some(a.clone()));
    assert_eq!(keyed.accounts_of_network("matrix").await.expect("list"), vec![a.clone()]);
    // The store without the key cannot open it (and says so).
    let e = store.account("sealed@localhost", "matrix").await.expect_err("no key");
    assert!(e.to_string().contains("no key"), "{e}");

    let settings = "{\"sasl_password\":\"hunter2\"}";
    keyed.set_user_settings("sealed@localhost", "irc", "srv", settings).await.expect("settings");
    let raw = raw_text("SELECT settings FROM user_settings WHERE account = $1", "sealed@localhost").await;
    assert!(secrets::is_sealed_text(&raw) && !raw.contains("hunter2"), "{raw}");
    assert_eq!(keyed.user_settings("sealed@localhost", "irc", "srv").await.expect("get").as_deref(), Some(settings));

    let session = RoomSessionRecord {
        room: "#sealed%srv@irc".into(),
        account: "sealed@localhost".into(),
        nick: "s".into(),
        password: Some("chan-key".into()),
        resources: vec!["sealed@localhost/r".into()],
    };
    keyed.upsert_room_session(&session).await.expect("session");
    let raw = raw_text("SELECT password FROM room_sessions WHERE account = $1", "sealed@localhost").await;
    assert!(secrets::is_sealed_text(&raw) && !raw.contains("chan-key"), "{raw}");
    let sessions = keyed.room_sessions().await.expect("sessions");
    assert!(sessions.contains(&session), "{sessions:?}");

    // A value copied into another row does not open there.
    let raw = raw_text("SELECT settings FROM user_settings WHERE account = $1", "sealed@localhost").await;
    keyed.set_user_settings("other@localhost", "irc", "srv", "{}").await.expect("other");
    sqlx::query("UPDATE user_settings SET settings = $1 WHERE account = $2")
        .bind(&raw)
        .bind("other@localhost")
        .execute(&store.pool)
        .await
        .expect("swap");
    let e = keyed.user_settings("other@localhost", "irc", "srv").await.expect_err("swapped");
    assert!(e.to_string().contains("belongs to another row"), "{e}");
    keyed.delete_user_settings("other@localhost", "irc", "srv").await.expect("delete");

    // Values in clear (written before sealing) are read as they are, then sealed once.
    store.set_user_settings("clear@localhost", "irc", "srv", "{\"password\":\"old-pass\"}").await.expect("clear");
    let clear = AccountRecord { xmpp_jid: "clear@localhost".into(), credentials: b"{\"t\":1}".to_vec(), ..a.clone() };
    store.upsert_account(&clear).await.expect("clear account");
    assert_eq!(
        keyed.user_settings("clear@localhost", "irc", "srv").await.expect("clear read").as_deref(),
        Some("{\"password\":\"old-pass\"}")
    );
    let report = keyed.seal_existing().await.expect("seal");
    assert!(report.sealed >= 2 && report.already >= 3 && report.unreadable == 0, "{report:?}");
    let raw = raw_text("SELECT settings FROM user_settings WHERE account = $1", "clear@localhost").await;
    assert!(secrets::is_sealed_text(&raw) && !raw.contains("old-pass"), "{raw}");
    assert!(secrets::is_sealed(&raw_credentials("clear@localhost").await));
    assert_eq!(keyed.account("clear@localhost", "matrix").await.expect("get"), Some(clear));
    let again = keyed.seal_existing().await.expect("seal again");
    assert_eq!(again.sealed, 0, "{again:?}");

    // Another key: refused, naming both keys.
    let other = store.clone().with_secrets(SecretBox::new(&[8; secrets::KEY_LEN]));
    let e = other.seal_existing().await.expect_err("wrong key");
    let text = e.to_string();
    assert!(
        text.contains(&key.key_id().to_string()) && text.contains(&other.secrets().expect("key").key_id().to_string()),
        "{text}"
    );
    assert!(matches!(other.account("sealed@localhost", "matrix").await, Err(StoreError::Sealed { .. })));
}

async fn outbox(store: &Store) {
    let row = |seq: i64, dest: &str| OutboxRow {
        seq,
        destination: dest.into(),
        event: format!("{{\"n\":{seq}}}"),
        created_us: 1,
        written_us: 0,
    };
    store.outbox_apply(&[row(30, "irc"), row(10, "xmpp"), row(20, "irc")], &[], 0, &[], &[]).await.expect("insert");
    // Inserting a row again changes nothing; removing an absent row is fine.
    store.outbox_apply(&[row(10, "other")], &[], 0, &[99], &[]).await.expect("idempotent");
    let seqs: Vec<(i64, String)> =
        store.outbox_pending().await.expect("pending").into_iter().map(|r| (r.seq, r.destination)).collect();
    assert_eq!(seqs, vec![(10, "xmpp".into()), (20, "irc".into()), (30, "irc".into())], "oldest first");
    let depth = store.outbox_depth().await.expect("depth");
    assert_eq!(
        depth,
        vec![
            OutboxDepth { destination: "irc".into(), rows: 2, oldest_us: 1 },
            OutboxDepth { destination: "xmpp".into(), rows: 1, oldest_us: 1 }
        ],
        "counted per destination"
    );
    let removals: Vec<i64> = (100..700).chain([10, 30]).collect(); // more than one statement's worth
    store.outbox_apply(&[row(40, "irc")], &[], 0, &removals, &[]).await.expect("remove");
    let left: Vec<i64> = store.outbox_pending().await.expect("pending").into_iter().map(|r| r.seq).collect();
    assert_eq!(left, vec![20, 40]);
    // Message ids written with the outbox's changes, also alone and again.
    let ids =
        IdMapEntry { key: "k".into(), network: "matrix".into(), scope: "r".into(), remote_ids: vec!["$e".into()] };
    store.outbox_apply(&[], &[], 0, &[20, 40], std::slice::from_ref(&ids)).await.expect("remove the rest");
    assert!(store.outbox_pending().await.expect("pending").is_empty());
    assert!(store.outbox_depth().await.expect("depth").is_empty());
    store.outbox_apply(&[], &[], 0, &[], &[ids]).await.expect("ids again");
    assert_eq!(store.key_for_remote("matrix", "r", "$e").await.expect("lookup"), Some("k".into()));
    // Batches larger than one statement's rows, with an id repeated inside the batch.
    let many: Vec<OutboxRow> = (1000..1250).map(|s| row(s, "irc")).collect();
    let mut entries: Vec<IdMapEntry> = (0..250)
        .map(|i| IdMapEntry {
            key: format!("m{i}"),
            network: "irc".into(),
            scope: "#c".into(),
            remote_ids: vec![format!("a{i}"), format!("b{i}")],
        })
        .collect();
    entries.push(entries[7].clone());
    store.outbox_apply(&many, &[], 0, &[], &entries).await.expect("large batch");
    assert_eq!(store.outbox_pending().await.expect("pending").len(), 250);
    assert_eq!(store.key_for_remote("irc", "#c", "b249").await.expect("lookup"), Some("m249".into()));
    assert_eq!(store.remote_ids_for("m7", "irc").await.expect("ids"), vec!["a7".to_owned(), "b7".to_owned()]);
    let seqs: Vec<i64> = (1000..1250).collect();
    store.outbox_apply(&[], &[], 0, &seqs, &[]).await.expect("remove the batch");
    assert!(store.outbox_pending().await.expect("pending").is_empty());
    // Rows marked written (in doubt after a crash): inserted so, or marked later.
    let written = OutboxRow { written_us: 5, ..row(2000, "irc") };
    store.outbox_apply(&[written, row(2001, "irc"), row(2002, "irc")], &[], 0, &[], &[]).await.expect("insert");
    store.outbox_apply(&[], &[2001], 7, &[2002], &[]).await.expect("mark");
    let marks: Vec<(i64, i64)> =
        store.outbox_pending().await.expect("pending").into_iter().map(|r| (r.seq, r.written_us)).collect();
    assert_eq!(marks, vec![(2000, 5), (2001, 7)]);
    store.outbox_apply(&[], &[], 0, &[2000, 2001], &[]).await.expect("remove");
    assert!(store.outbox_pending().await.expect("pending").is_empty());
}

async fn room_sessions(store: &Store) {
    let mut r = RoomSessionRecord {
        room: "#a%irc.example@irc.localhost".into(),
        account: "alice@example.org".into(),
        nick: "alice".into(),
        password: Some("key".into()),
        resources: vec!["alice@example.org/phone".into(), "alice@example.org/laptop".into()],
    };
    store.upsert_room_session(&r).await.expect("upsert");
    assert_eq!(store.room_sessions().await.expect("list"), vec![r.clone()]);
    r.nick = "alice_".into();
    r.resources.truncate(1);
    store.upsert_room_session(&r).await.expect("update");
    assert_eq!(store.room_sessions().await.expect("list"), vec![r.clone()]);
    store.delete_room_session(&r.room, &r.account).await.expect("delete");
    assert!(store.room_sessions().await.expect("list").is_empty());
}

async fn local_users_and_rosters(store: &Store) {
    let u = LocalUserRecord {
        jid: "alice@localhost".into(),
        scram_sha1: "4096$c2FsdA==$AAAA".into(),
        scram_sha256: "4096$c2FsdA==$BBBB".into(),
        created_us: 1,
    };
    assert_eq!(store.count_local_users().await.expect("count"), 0);
    store.upsert_local_user(&u).await.expect("add user");
    assert_eq!(store.count_local_users().await.expect("count"), 1);
    assert_eq!(store.local_user("alice@localhost").await.expect("get"), Some(u.clone()));
    let changed = LocalUserRecord { scram_sha256: "4096$c2FsdA==$CCCC".into(), ..u.clone() };
    store.upsert_local_user(&changed).await.expect("change password");
    assert_eq!(
        store.local_user("alice@localhost").await.expect("get").map(|u| u.scram_sha256),
        Some(changed.scram_sha256)
    );
    assert_eq!(store.local_user("bob@localhost").await.expect("get"), None);

    let item = RosterRecord {
        owner: "alice@localhost".into(),
        contact: "bob@localhost".into(),
        name: Some("Bob".into()),
        subscription: "none".into(),
        ask: Some("subscribe".into()),
        groups: "Friends\nWork".into(),
    };
    store.upsert_roster_item(&item).await.expect("roster add");
    let both = RosterRecord { subscription: "both".into(), ask: None, ..item.clone() };
    store.upsert_roster_item(&both).await.expect("roster update");
    assert_eq!(store.roster("alice@localhost").await.expect("roster"), vec![both.clone()]);
    assert_eq!(store.roster_item("alice@localhost", "bob@localhost").await.expect("item"), Some(both));
    assert!(store.roster("bob@localhost").await.expect("roster").is_empty());
    assert!(store.delete_roster_item("alice@localhost", "bob@localhost").await.expect("delete"));
    assert!(!store.delete_roster_item("alice@localhost", "bob@localhost").await.expect("delete again"));
    store.upsert_roster_item(&item).await.expect("roster add");
    assert!(store.delete_local_user("alice@localhost").await.expect("delete user"));
    assert!(store.roster("alice@localhost").await.expect("roster").is_empty(), "the roster goes with the account");
    assert!(!store.delete_local_user("alice@localhost").await.expect("delete again"));
}

async fn puppets(store: &Store) {
    let mut p = PuppetRecord {
        network: "irc".into(),
        remote_id: "Bob%irc.example".into(),
        jid: "bob%irc.example@irc.localhost".into(),
        name: "Bob".into(),
        avatar_hash: None,
        updated_us: 1,
    };
    store.upsert_puppet(&p).await.expect("insert puppet");
    assert_eq!(store.puppet_by_remote("irc", "Bob%irc.example").await.expect("get"), Some(p.clone()));
    p.name = "Bobby".into();
    p.avatar_hash = Some("abc".into());
    store.upsert_puppet(&p).await.expect("update puppet");
    assert_eq!(store.puppet_by_jid("bob%irc.example@irc.localhost").await.expect("get"), Some(p));
    assert_eq!(store.puppet_by_remote("irc", "nobody").await.expect("get"), None);
    // case matters (Matrix ids are case-sensitive)
    assert_eq!(store.puppet_by_remote("irc", "bob%irc.example").await.expect("get"), None);
}

async fn rooms_and_portals(store: &Store) {
    let r = RoomRecord {
        network: "irc".into(),
        remote_id: "#test%srv".into(),
        jid: "#test%srv@irc.localhost".into(),
        name: Some("test".into()),
        portal: None,
    };
    store.upsert_room(&r).await.expect("room");
    let r2 = RoomRecord { remote_id: "#a%srv".into(), jid: "#a%srv@irc.localhost".into(), ..r.clone() };
    store.upsert_room(&r2).await.expect("room 2");
    assert_eq!(store.room_by_jid("#test%srv@irc.localhost").await.expect("get"), Some(r.clone()));
    assert_eq!(store.room_by_remote("irc", "#test%srv").await.expect("get"), Some(r.clone()));
    let all = store.rooms_of_network("irc").await.expect("list");
    assert_eq!(all.iter().map(|r| r.remote_id.as_str()).collect::<Vec<_>>(), vec!["#a%srv", "#test%srv"]);

    let members = vec![("discord".to_owned(), "123".to_owned()), ("irc".to_owned(), "#test%srv".to_owned())];
    store.set_portal_members("lobby", &members).await.expect("portal");
    assert_eq!(store.portal_members("lobby").await.expect("members"), members);
    assert_eq!(store.portal_of("irc", "#test%srv").await.expect("of"), Some("lobby".into()));
    store.set_portal_members("lobby", &members[..1]).await.expect("replace");
    assert_eq!(store.portal_members("lobby").await.expect("members"), members[..1].to_vec());
    assert_eq!(store.portal_of("irc", "#test%srv").await.expect("of"), None);
}

async fn accounts(store: &Store) {
    let a = AccountRecord {
        xmpp_jid: "alice@localhost".into(),
        network: "matrix".into(),
        remote_user: "@alice:m.org".into(),
        credentials: vec![0, 1, 2, 255],
        settings: "{}".into(),
        updated_us: 5,
    };
    store.upsert_account(&a).await.expect("account");
    assert_eq!(store.account("alice@localhost", "matrix").await.expect("get"), Some(a.clone()));
    let b = AccountRecord { settings: "{\"nick\":\"al\"}".into(), ..a.clone() };
    store.upsert_account(&b).await.expect("update");
    assert_eq!(store.accounts_of_network("matrix").await.expect("list"), vec![b]);
    assert!(store.delete_account("alice@localhost", "matrix").await.expect("delete"));
    assert!(!store.delete_account("alice@localhost", "matrix").await.expect("delete again"));
    assert_eq!(store.account("alice@localhost", "matrix").await.expect("get"), None);
}

async fn user_settings(store: &Store) {
    let (alice, net) = ("alice@localhost", "irc.localhost");
    assert_eq!(store.user_settings(alice, net, "srv").await.expect("get"), None);
    store.set_user_settings(alice, net, "srv", "{\"nick\":\"al\"}").await.expect("set");
    store.set_user_settings(alice, net, "other", "{}").await.expect("set other server");
    store.set_user_settings("bob@localhost", net, "srv", "{\"nick\":\"b\"}").await.expect("set bob");
    assert_eq!(store.user_settings(alice, net, "srv").await.expect("get").as_deref(), Some("{\"nick\":\"al\"}"));
    store.set_user_settings(alice, net, "srv", "{\"nick\":\"al2\"}").await.expect("replace");
    assert_eq!(store.user_settings(alice, net, "srv").await.expect("get").as_deref(), Some("{\"nick\":\"al2\"}"));
    assert_eq!(store.user_settings(alice, net, "other").await.expect("get").as_deref(), Some("{}"));
    assert_eq!(
        store.user_settings("bob@localhost", net, "srv").await.expect("get").as_deref(),
        Some("{\"nick\":\"b\"}")
    );
    assert_eq!(store.user_settings(alice, "matrix", "srv").await.expect("other network"), None);
    assert!(store.delete_user_settings(alice, net, "srv").await.expect("delete"));
    assert!(!store.delete_user_settings(alice, net, "srv").await.expect("delete again"));
    assert_eq!(store.user_settings(alice, net, "srv").await.expect("get"), None);
    assert_eq!(
        store.user_settings("bob@localhost", net, "srv").await.expect("get").as_deref(),
        Some("{\"nick\":\"b\"}")
    );
}

async fn message_map(store: &Store) {
    let ids = vec!["line-1".to_owned(), "line-2".to_owned(), "line-3".to_owned()];
    store.map_message("k1", "irc", "alice/irc:#c", &ids).await.expect("map");
    store.map_message("k1", "xmpp", "alice/irc:#c", &["origin-1".to_owned()]).await.expect("map xmpp");
    // idempotent
    store.map_message("k1", "irc", "alice/irc:#c", &ids).await.expect("map again");
    assert_eq!(store.remote_ids_for("k1", "irc").await.expect("ids"), ids);
    assert_eq!(store.remote_ids_for("k1", "xmpp").await.expect("ids"), vec!["origin-1".to_owned()]);
    assert_eq!(store.key_for_remote("irc", "alice/irc:#c", "line-2").await.expect("key"), Some("k1".into()));
    assert_eq!(store.key_for_remote("xmpp", "alice/irc:#c", "origin-1").await.expect("key"), Some("k1".into()));
    // the same id in another scope is another message
    assert_eq!(store.key_for_remote("irc", "bob/irc:#c", "line-2").await.expect("key"), None);
    assert!(store.remote_ids_for("missing", "irc").await.expect("ids").is_empty());
}

fn entry(room: &str, owner: Option<&str>, n: usize, time_us: i64, nick: &str) -> ArchiveEntry {
    ArchiveEntry {
        archive_id: next_archive_id(),
        stanza_id: format!("{room}-{}-{n}", owner.unwrap_or("shared")),
        origin_id: Some(format!("o{n}")),
        room: room.into(),
        owner: owner.map(str::to_owned),
        sender_nick: nick.into(),
        sender_jid: Some(format!("{nick}@x")),
        time_us,
        body: format!("message {n}"),
        payload: None,
    }
}

async fn archive_visibility(store: &Store) {
    let room = "#vis%srv@irc.localhost";
    let batch = vec![
        entry(room, Some("alice@localhost"), 1, 10, "bob"),
        entry(room, Some("carol@localhost"), 2, 11, "bob"),
        entry(room, None, 3, 12, "bob"),
    ];
    store.archive_append(&batch).await.expect("append");
    store.archive_append(&batch).await.expect("appending the same stanza ids again is harmless");
    let q = ArchiveQuery { room: room.into(), owner: Some("alice@localhost".into()), max: 50, ..Default::default() };
    let page = store.archive_query(&q).await.expect("query");
    let bodies: Vec<_> = page.entries.iter().map(|e| e.body.as_str()).collect();
    assert_eq!(bodies, vec!["message 1", "message 3"], "alice sees her own and shared entries only");
    assert!(page.complete);
    let q = ArchiveQuery { owner: None, ..q };
    assert_eq!(store.archive_query(&q).await.expect("query").entries.len(), 1, "anonymous sees shared only");
    assert_eq!(store.archive_get(&batch[0].stanza_id).await.expect("get"), Some(batch[0].clone()));
    // Removing (moderation) reaches only what the account sees, in that room.
    let alice = Some("alice@localhost");
    assert_eq!(store.archive_remove(room, alice, &batch[1].stanza_id).await.expect("remove"), 0, "carol's own");
    assert_eq!(store.archive_remove("#elsewhere", alice, &batch[0].stanza_id).await.expect("remove"), 0);
    assert_eq!(store.archive_remove(room, alice, &batch[0].stanza_id).await.expect("remove"), 1);
    assert_eq!(store.archive_remove(room, None, &batch[1].stanza_id).await.expect("remove"), 0, "shared only");
    assert_eq!(store.archive_remove(room, None, &batch[2].stanza_id).await.expect("remove"), 1, "shared");
    assert_eq!(store.archive_get(&batch[0].stanza_id).await.expect("get"), None);
    assert_eq!(store.archive_get(&batch[1].stanza_id).await.expect("get"), Some(batch[1].clone()));
}

async fn archive_paging(store: &Store) {
    let room = "#page%srv@irc.localhost";
    let all: Vec<ArchiveEntry> = (0..500).map(|n| entry(room, None, n, 1_000 + n as i64, "bob")).collect();
    for chunk in all.chunks(250) {
        store.archive_append(chunk).await.expect("append");
    }
    // forward
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let q = ArchiveQuery { room: room.into(), after: after.clone(), max: 50, ..Default::default() };
        let page = store.archive_query(&q).await.expect("page");
        assert!(page.entries.len() <= 50);
        seen.extend(page.entries.iter().map(|e| e.stanza_id.clone()));
        after = page.last.clone();
        if page.complete {
            break;
        }
    }
    assert_eq!(seen, all.iter().map(|e| e.stanza_id.clone()).collect::<Vec<_>>(), "forward: none missing or repeated");
    // backward from the newest page
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let q = ArchiveQuery {
            room: room.into(),
            before: before.clone(),
            last_page: before.is_none(),
            max: 50,
            ..Default::default()
        };
        let page = store.archive_query(&q).await.expect("page");
        assert!(page.entries.windows(2).all(|w| w[0].archive_id < w[1].archive_id), "ascending within a page");
        let mut ids: Vec<String> = page.entries.iter().map(|e| e.stanza_id.clone()).collect();
        ids.extend(seen);
        seen = ids;
        before = page.first.clone();
        if page.complete {
            break;
        }
    }
    assert_eq!(seen, all.iter().map(|e| e.stanza_id.clone()).collect::<Vec<_>>(), "backward: none missing or repeated");
    // an unknown paging id gives an empty page, not everything
    let q = ArchiveQuery { room: room.into(), after: Some("nope".into()), max: 50, ..Default::default() };
    assert!(store.archive_query(&q).await.expect("page").entries.is_empty());
}

async fn archive_filters_and_expiry(store: &Store) {
    let room = "#filter%srv@irc.localhost";
    let batch: Vec<ArchiveEntry> =
        (0..10).map(|n| entry(room, None, n, 100 * n as i64, if n % 2 == 0 { "even" } else { "odd" })).collect();
    store.archive_append(&batch).await.expect("append");
    let q = ArchiveQuery { room: room.into(), start_us: Some(200), end_us: Some(500), max: 50, ..Default::default() };
    let times: Vec<i64> = store.archive_query(&q).await.expect("q").entries.iter().map(|e| e.time_us).collect();
    assert_eq!(times, vec![200, 300, 400, 500]);
    let q = ArchiveQuery { room: room.into(), with_nick: Some("odd".into()), max: 50, ..Default::default() };
    assert_eq!(store.archive_query(&q).await.expect("q").entries.len(), 5);
    let q = ArchiveQuery { room: room.into(), with_jid: Some("even@x".into()), max: 2, ..Default::default() };
    let page = store.archive_query(&q).await.expect("q");
    assert_eq!(page.entries.len(), 2);
    assert!(!page.complete);
    let removed = store.archive_expire(300).await.expect("expire");
    assert!(removed >= 3, "entries at 0, 100, 200 are gone (got {removed})");
    let q = ArchiveQuery { room: room.into(), max: 50, ..Default::default() };
    assert_eq!(store.archive_query(&q).await.expect("q").entries.first().map(|e| e.time_us), Some(300));
}
