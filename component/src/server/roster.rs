//! Rosters and presence subscriptions of the embedded server (RFC 6121 §2–3):
//! roster get/set with pushes, and the subscription state machine for local
//! contacts. Contacts on a network domain (puppets) are approved at once: the
//! gateway is part of this server and its people have no say over presence.

use isthmus_core::store::RosterRecord;
use tokio_xmpp::minidom::Element;
use tracing::warn;

use super::Server;
use super::xml::{self, CLIENT, ROSTER, elem, error_reply, set_attr};

fn item_element(r: &RosterRecord) -> Element {
    let mut item = elem("item", ROSTER, &[("jid", &r.contact), ("subscription", &r.subscription)]);
    set_attr(&mut item, "name", r.name.as_deref());
    set_attr(&mut item, "ask", r.ask.as_deref());
    for g in r.groups.lines().filter(|g| !g.is_empty()) {
        item.append_child(xml::with_text(Element::bare("group", ROSTER), g));
    }
    item
}

fn removed_element(contact: &str) -> Element {
    elem("item", ROSTER, &[("jid", contact), ("subscription", "remove")])
}

/// How a subscription state changes (RFC 6121 tables).
fn add_to(s: &str) -> &'static str {
    match s {
        "from" | "both" => "both",
        _ => "to",
    }
}
fn add_from(s: &str) -> &'static str {
    match s {
        "to" | "both" => "both",
        _ => "from",
    }
}
fn drop_to(s: &str) -> &'static str {
    match s {
        "both" | "from" => "from",
        _ => "none",
    }
}
fn drop_from(s: &str) -> &'static str {
    match s {
        "both" | "to" => "to",
        _ => "none",
    }
}

impl Server {
    async fn item_or_new(&self, owner: &str, contact: &str) -> RosterRecord {
        let found = self.store.roster_item(owner, contact).await.unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the roster");
            None
        });
        found.unwrap_or_else(|| RosterRecord {
            owner: owner.to_owned(),
            contact: contact.to_owned(),
            name: None,
            subscription: "none".into(),
            ask: None,
            groups: String::new(),
        })
    }

    async fn save_and_push(&self, r: &RosterRecord) {
        if let Err(e) = self.store.upsert_roster_item(r).await {
            warn!(error = %e, "cannot save the roster");
        }
        self.push_roster(&r.owner, item_element(r));
    }

    pub(super) async fn roster_iq(&self, full: &str, user: &str, iq: &Element, query: &Element, kind: &str) {
        if iq.attr("to").is_some_and(|t| t != user) {
            self.send_to_full(full, error_reply(iq, "cancel", "forbidden", Some("only your own roster")));
            return;
        }
        match kind {
            "get" => match self.store.roster(user).await {
                Ok(items) => {
                    let mut q = Element::bare("query", ROSTER);
                    for r in &items {
                        q.append_child(item_element(r));
                    }
                    self.send_to_full(full, xml::iq_result(iq, Some(q)));
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the roster");
                    self.send_to_full(
                        full,
                        error_reply(iq, "wait", "internal-server-error", Some("the roster store is unavailable")),
                    );
                }
            },
            "set" => {
                let items: Vec<&Element> = query.children().filter(|c| c.is("item", ROSTER)).collect();
                let [item] = items.as_slice() else {
                    self.send_to_full(
                        full,
                        error_reply(iq, "modify", "bad-request", Some("a roster set carries exactly one item")),
                    );
                    return;
                };
                let Some(contact) = item.attr("jid").and_then(|j| j.parse::<tokio_xmpp::parsers::jid::BareJid>().ok())
                else {
                    self.send_to_full(
                        full,
                        error_reply(iq, "modify", "jid-malformed", Some("the item's jid is not a bare JID")),
                    );
                    return;
                };
                let contact = contact.to_string();
                if item.attr("subscription") == Some("remove") {
                    let old = self.item_or_new(user, &contact).await;
                    let _ = self.store.delete_roster_item(user, &contact).await;
                    self.send_to_full(full, xml::iq_result(iq, None));
                    self.push_roster(user, removed_element(&contact));
                    if old.subscription == "to" || old.subscription == "both" {
                        let p = elem("presence", CLIENT, &[("type", "unsubscribe"), ("from", user), ("to", &contact)]);
                        self.outbound_subscription(user, &contact, p).await;
                    }
                    if old.subscription == "from" || old.subscription == "both" {
                        let p = elem("presence", CLIENT, &[("type", "unsubscribed"), ("from", user), ("to", &contact)]);
                        self.outbound_subscription(user, &contact, p).await;
                    }
                    let _ = self.store.delete_roster_item(user, &contact).await;
                    return;
                }
                let mut r = self.item_or_new(user, &contact).await;
                r.name = item.attr("name").map(str::to_owned);
                r.groups = item
                    .children()
                    .filter(|c| c.is("group", ROSTER))
                    .map(|g| g.text().replace('\n', " "))
                    .collect::<Vec<_>>()
                    .join("\n");
                self.send_to_full(full, xml::iq_result(iq, None));
                self.save_and_push(&r).await;
            }
            _ => {}
        }
    }

    /// `user` sends subscribe/subscribed/unsubscribe/unsubscribed to `contact`.
    pub(super) async fn outbound_subscription(&self, user: &str, contact: &str, mut el: Element) {
        let contact = xml::bare(contact).to_owned();
        let kind = el.attr("type").unwrap_or_default().to_owned();
        set_attr(&mut el, "from", Some(user));
        set_attr(&mut el, "to", Some(&contact));
        let mut mine = self.item_or_new(user, &contact).await;
        match kind.as_str() {
            "subscribe" => {
                if mine.subscription == "to" || mine.subscription == "both" {
                    // Already subscribed: answer for the contact (RFC 6121 §3.1.3).
                    let ok = elem("presence", CLIENT, &[("type", "subscribed"), ("from", &contact), ("to", user)]);
                    for full in self.resources(user, false) {
                        let mut c = ok.clone();
                        set_attr(&mut c, "to", Some(&full));
                        self.send_to_full(&full, c);
                    }
                    return;
                }
                mine.ask = Some("subscribe".into());
            }
            "subscribed" => mine.subscription = add_from(&mine.subscription).into(),
            "unsubscribe" => {
                mine.subscription = drop_to(&mine.subscription).into();
                mine.ask = None;
            }
            "unsubscribed" => mine.subscription = drop_from(&mine.subscription).into(),
            _ => return,
        }
        self.save_and_push(&mine).await;
        if self.network_of(&contact).is_some() {
            self.route(el).await;
            if kind == "subscribe" {
                // Puppets approve at once.
                let ok = elem("presence", CLIENT, &[("type", "subscribed"), ("from", &contact), ("to", user)]);
                self.inbound_subscription(user, ok).await;
            }
            return;
        }
        if self.is_local(&contact) {
            self.inbound_subscription(&contact, el.clone()).await;
            if kind == "subscribed" {
                for mut p in self.presences_of(user) {
                    set_attr(&mut p, "to", Some(&contact));
                    self.deliver_local(p).await;
                }
            }
            if kind == "unsubscribed" {
                for full in self.resources(user, true) {
                    let gone = elem("presence", CLIENT, &[("type", "unavailable"), ("from", &full), ("to", &contact)]);
                    self.deliver_local(gone).await;
                }
            }
        }
    }

    /// A subscription stanza arrives for local account `user`.
    pub(super) async fn inbound_subscription(&self, user: &str, el: Element) {
        let from = xml::bare(el.attr("from").unwrap_or_default()).to_owned();
        let kind = el.attr("type").unwrap_or_default().to_owned();
        let mut item = self.item_or_new(user, &from).await;
        let deliver = match kind.as_str() {
            "subscribe" => {
                if item.subscription == "from" || item.subscription == "both" {
                    // Already approved: answer without bothering the user.
                    let ok = elem("presence", CLIENT, &[("type", "subscribed"), ("from", user), ("to", &from)]);
                    Box::pin(self.route(ok)).await;
                    return;
                }
                true
            }
            "subscribed" => {
                if item.ask.is_none() && (item.subscription == "to" || item.subscription == "both") {
                    return;
                }
                item.subscription = add_to(&item.subscription).into();
                item.ask = None;
                self.save_and_push(&item).await;
                true
            }
            "unsubscribe" => {
                item.subscription = drop_from(&item.subscription).into();
                self.save_and_push(&item).await;
                true
            }
            "unsubscribed" => {
                item.subscription = drop_to(&item.subscription).into();
                item.ask = None;
                self.save_and_push(&item).await;
                true
            }
            _ => false,
        };
        if deliver {
            for full in self.resources(user, false) {
                let mut copy = el.clone();
                set_attr(&mut copy, "from", Some(&from));
                set_attr(&mut copy, "to", Some(&full));
                self.send_to_full(&full, copy);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_states_follow_rfc6121() {
        assert_eq!(add_to("none"), "to");
        assert_eq!(add_to("from"), "both");
        assert_eq!(add_from("to"), "both");
        assert_eq!(drop_to("both"), "from");
        assert_eq!(drop_from("both"), "to");
        assert_eq!(drop_from("from"), "none");
    }
}
