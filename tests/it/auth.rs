//! Auth events.
