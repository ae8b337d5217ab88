//! Block backends, persistent rings and the node metadata store.
