//! Hostile and malformed input (being written).
