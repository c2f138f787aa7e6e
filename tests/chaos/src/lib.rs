//! What the fault matrix shares with the soak (`tidemark-bench soak`): the
//! services as separate processes of their real binaries.

pub mod plane;
