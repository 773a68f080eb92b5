//! (being written: the Index in Redis)
