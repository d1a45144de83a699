//! The `mongodb` engine: a native dump with the `mongodb` driver, into mongodump's archive
//! format (`zstd -dc FILE | mongorestore --archive` restores it), one artifact per database.

pub mod archive;
