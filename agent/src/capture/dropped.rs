//! What the daemon's sampling dropped, exactly: the tickets of the records
//! it sampled out that the ring may still hold. A daemon capture exports
//! these and nothing else, so it never duplicates a span it exported.
//!
//! Tickets are noted in the order the daemon's consumer reads them
//! (increasing), and forgotten once the ring can no longer hold them (more
//! than its capacity below the consumer's cursor): at most one entry per
//! slot of the ring.

use std::collections::VecDeque;

/// The recently sampled-out tickets of one ring.
#[derive(Clone, Debug)]
pub struct DroppedTickets {
    /// Increasing.
    tickets: VecDeque<u64>,
    capacity: u64,
}

impl DroppedTickets {
    /// For a ring of `capacity` slots.
    pub fn new(capacity: u64) -> Self {
        Self {
            tickets: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// The record of `ticket` was sampled out (tickets come in increasing
    /// order; one out of order is ignored, never mis-sorted).
    pub fn note(&mut self, ticket: u64) {
        if self.tickets.back().is_some_and(|&last| last >= ticket) {
            return;
        }
        self.tickets.push_back(ticket);
        self.forget_below(ticket.saturating_add(1).saturating_sub(self.capacity));
    }

    /// Forgets tickets below `oldest` (the ring no longer holds them).
    pub fn forget_below(&mut self, oldest: u64) {
        while self.tickets.front().is_some_and(|&t| t < oldest) {
            self.tickets.pop_front();
        }
    }

    /// Whether the record of `ticket` was sampled out.
    pub fn contains(&self, ticket: u64) -> bool {
        self.tickets.binary_search(&ticket).is_ok()
    }

    /// Tickets held.
    pub fn len(&self) -> usize {
        self.tickets.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.tickets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_exactly_the_noted_tickets_the_ring_can_still_hold() {
        let mut d = DroppedTickets::new(8);
        for t in [1, 2, 5, 9] {
            d.note(t);
        }
        assert!(d.contains(2) && d.contains(5) && d.contains(9));
        assert!(!d.contains(3) && !d.contains(4) && !d.contains(8));
        // Ticket 9 was noted: the ring of 8 holds 2..=9 at most.
        assert!(!d.contains(1));
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn stays_bounded_by_the_ring_capacity() {
        let mut d = DroppedTickets::new(16);
        for t in 0..10_000 {
            d.note(t);
        }
        assert_eq!(d.len(), 16);
        assert!(d.contains(9_999) && d.contains(9_984) && !d.contains(9_983));
        // Out of order or repeated: ignored.
        d.note(5);
        d.note(9_999);
        assert_eq!(d.len(), 16);
    }
}
