//! How long the proxy's TCP sockets hold back an acknowledgement, per connection, from how its
//! peer sends.
//!
//! An HTTP exchange is a message each way. When a request comes whole, the response that
//! answers it can carry its ACK, and when a response comes whole, so can the next request on
//! that pooled upstream connection. A 1 ms delayed ACK rarely waits that long on a loaded core:
//! with 10,000 connections `fulcrum-bench l7` saw a segment of its own for one in four requests
//! to clients and one in two to backends (and about one each with its clock at a saturated
//! core's pace), each a visit to a socket no longer in cache and a frame for both ends.
//!
//! Holding ACKs longer is safe only while the peer does not wait for them. A peer with Nagle's
//! algorithm that writes a message in two small pieces (a POST's head and then its body; a
//! backend's response head and then its body) holds the second piece until the first is
//! acknowledged: a held ACK becomes a stall. smoltcp has no "acknowledge now" call, and a
//! running delayed-ACK timer keeps the delay it started with, so the proxy cannot shorten it
//! once it sees the first piece. Hence three states, as Linux's quick-ack mode at a connection's
//! start and its 40 ms minimum delayed ACK (`TCP_DELACK_MIN`):
//! - `Quick` at the start: 1 ms, so a connection whose first request (or response) comes in
//!   pieces is not held up;
//! - `Delayed` once one exchange went by with every message from the peer whole: 40 ms;
//! - `AlwaysQuick` after a message from the peer is seen in pieces, for the connection's life.
//!   The one such message after `Delayed` waits at most 40 ms for its next piece.
//!
//! Large transfers are unaffected: smoltcp acknowledges at once every full segment's worth
//! of new data whatever the delay.

/// Delay for a connection that is `Quick` (and for every socket outside the proxy's control).
pub const QUICK_ACK_MS: u64 = 1;
/// Delay once the peer is seen to send whole messages: Linux's minimum delayed ACK, well
/// under any sender's minimum retransmission timeout (200 ms on Linux, 1 s by RFC 6298).
pub const DELAYED_ACK_MS: u64 = 40;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AckPace {
    #[default]
    Quick,
    Delayed,
    AlwaysQuick,
}

impl AckPace {
    /// After an exchange in which every message from the peer came whole.
    pub fn after_whole_exchange(self) -> AckPace {
        match self {
            AckPace::Quick => AckPace::Delayed,
            s => s,
        }
    }

    /// After a message from the peer was left incomplete with all its bytes so far read.
    pub fn after_pieces(self) -> AckPace {
        AckPace::AlwaysQuick
    }

    pub fn delay_ms(self) -> u64 {
        match self {
            AckPace::Delayed => DELAYED_ACK_MS,
            AckPace::Quick | AckPace::AlwaysQuick => QUICK_ACK_MS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AckPace::*;
    use super::*;

    #[test]
    fn quick_until_an_exchange_is_whole_then_delayed_until_a_message_comes_in_pieces() {
        let p = AckPace::default();
        assert_eq!(p.delay_ms(), QUICK_ACK_MS);
        let p = p.after_whole_exchange();
        assert_eq!((p, p.delay_ms()), (Delayed, DELAYED_ACK_MS));
        assert_eq!(p.after_whole_exchange(), Delayed);
        let p = p.after_pieces();
        assert_eq!((p, p.delay_ms()), (AlwaysQuick, QUICK_ACK_MS));
        assert_eq!(p.after_whole_exchange(), AlwaysQuick, "pieces once: quick for good");
        assert_eq!(Quick.after_pieces(), AlwaysQuick, "pieces in the first exchange");
    }
}
