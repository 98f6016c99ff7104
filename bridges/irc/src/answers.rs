//! Requests made for the XMPP user that the IRC server answers only by doing them
//! or by an error line: a nick change (`NICK`, refused with 433/432) and a topic
//! change (`TOPIC`, refused with 482 or 442). The delivery waits a little for the
//! answer, so a refusal comes back as the error XMPP expects (XEP-0045 §7.6: a
//! presence error `conflict`; §8.1: a message error `forbidden`) instead of a line
//! from the server's address.

use std::collections::VecDeque;
use std::time::Duration;

use isthmus_core::network::DeliveryError;
use tokio::sync::oneshot;

/// How long a delivery waits for the server's answer; past it the request is
/// taken as accepted (what the server does later still shows).
pub(crate) const WAIT: Duration = Duration::from_secs(5);

/// Most topic changes waiting at once (the oldest stops waiting first).
const MAX_TOPICS: usize = 16;

type Reply = oneshot::Sender<Result<(), DeliveryError>>;

/// The server's answer to one request, once it comes.
pub(crate) type Answer = oneshot::Receiver<Result<(), DeliveryError>>;

/// A nick change waiting for the server's answer.
#[derive(Debug)]
pub(crate) struct NickWait {
    /// The nick asked for.
    pub nick: String,
    reply: Reply,
}

impl NickWait {
    pub fn answer(self, result: Result<(), DeliveryError>) {
        let _ = self.reply.send(result);
    }
}

/// The requests waiting for the server's answer on one connection.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// The nick change under way (a newer one replaces it).
    nick: Option<NickWait>,
    /// Topic changes, with their channel case-folded, oldest first.
    topics: VecDeque<(String, Reply)>,
}

impl Pending {
    /// A nick change to `nick` is asked for.
    pub fn nick(&mut self, nick: &str) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.nick = Some(NickWait { nick: nick.to_owned(), reply });
        answer
    }

    /// The nick change waiting for its answer, if any.
    pub fn take_nick(&mut self) -> Option<NickWait> {
        self.nick.take()
    }

    /// A topic change of `channel` (case-folded) is asked for.
    pub fn topic(&mut self, channel: &str) -> Answer {
        if self.topics.len() == MAX_TOPICS {
            self.topics.pop_front();
        }
        let (reply, answer) = oneshot::channel();
        self.topics.push_back((channel.to_owned(), reply));
        answer
    }

    /// The oldest topic change of `channel` (case-folded) has its answer; false when none waited.
    pub fn topic_answered(&mut self, channel: &str, result: Result<(), DeliveryError>) -> bool {
        let Some(i) = self.topics.iter().position(|(c, _)| c == channel) else { return false };
        if let Some((_, reply)) = self.topics.remove(i) {
            let _ = reply.send(result);
        }
        true
    }
}

/// What the server answered within [`WAIT`]; no answer (or a connection gone
/// meanwhile) counts as accepted.
pub(crate) async fn outcome(answer: Answer) -> Result<(), DeliveryError> {
    match tokio::time::timeout(WAIT, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) | Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_reach_the_request_they_are_about() {
        let mut p = Pending::default();
        let first = p.topic("#a");
        let other = p.topic("#b");
        assert!(p.topic_answered("#b", Err(DeliveryError::Forbidden("no".into()))));
        assert!(matches!(outcome(other).await, Err(DeliveryError::Forbidden(_))));
        assert!(p.topic_answered("#a", Ok(())));
        assert!(outcome(first).await.is_ok());
        assert!(!p.topic_answered("#a", Ok(())), "nothing waits any more");

        let old = p.nick("bob");
        let new = p.nick("carol");
        assert!(outcome(old).await.is_ok(), "a replaced request stops waiting");
        let wait = p.take_nick().expect("waiting");
        assert_eq!(wait.nick, "carol");
        wait.answer(Err(DeliveryError::Conflict("taken".into())));
        assert!(matches!(outcome(new).await, Err(DeliveryError::Conflict(_))));
        assert!(p.take_nick().is_none());
    }

    #[test]
    fn topic_waits_are_bounded() {
        let mut p = Pending::default();
        let answers: Vec<Answer> = (0..MAX_TOPICS + 4).map(|_| p.topic("#a")).collect();
        assert_eq!(p.topics.len(), MAX_TOPICS);
        drop(answers);
    }
}
