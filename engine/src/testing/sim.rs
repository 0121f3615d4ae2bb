//! The seeded simulated I/O layer and its crash journal.
