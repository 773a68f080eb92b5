//! (being written: the S3-compatible bucket)
